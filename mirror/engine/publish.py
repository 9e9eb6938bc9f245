"""A sync job's registry destination: after an image is cached, push it on, unless the target already has it.

Registry-to-registry mirroring goes through the cache: the job's source fills the cache as
always, then the image's stored bytes are pushed with `Pusher` (blobs skipped when present,
mounted from another repository of the target pushed to in this run, else uploaded;
manifests last, so digests match the source). Whether the target is up to date is decided
by one `HEAD /v2/NAME/manifests/TAG` at the target (distribution spec "Checking if content
exists"), not by the state file: a target that lost the image, or was reset, gets it again.
An index cached with a platform filter is pushed as a new index of the cached platforms
(`plan_push`); its digest is deterministic, so the same HEAD finds a no-op run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mirror.engine.push import Pusher, plan_push
from mirror.errors import MirrorError, StoreError, UsageError
from mirror.reference import Reference

# PushOutcome statuses.
PUSHED = "pushed"  # sent to the target (some or all blobs may have been there already)
PRESENT = "present"  # the target's tag already names the cached digest: one HEAD, nothing sent
WOULD_PUSH = "would push"  # dry run: the target lacks it or names another digest
PUSH_FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RegistryTarget:
    """A job's `destination = {type = "registry", ...}`: the target registry host and a repository prefix."""

    host: str
    prefix: str = ""
    source_digests_only: bool = False  # refuse an index cached with a platform filter (no subset index)

    @classmethod
    def of(cls, host: str, prefix: str = "") -> RegistryTarget:
        """Return the target `host` (`HOST[:PORT]`) with repository `prefix`; UsageError names what is wrong."""
        parsed = Reference.parse(f"{host}/x")
        if not host or parsed.repository not in ("x", "library/x"):
            raise UsageError(f"{host!r} is not a registry host (write it with a '.' or ':PORT')")
        prefix = prefix.strip("/")
        if prefix:
            Reference.parse(f"{host}/{prefix}/x")
        return cls(parsed.registry, prefix)

    def with_source_digests_only(self, only: bool) -> RegistryTarget:
        """Return this target refusing (True) or pushing as subsets (False) indexes cached with a platform filter."""
        return replace(self, source_digests_only=only)

    def reference(self, ref: Reference) -> Reference:
        """Return where the cached `ref` goes: `HOST/PREFIX/REPOSITORY:TAG` (the source host dropped)."""
        path = f"{self.prefix}/{ref.repository}" if self.prefix else ref.repository
        return Reference.parse(f"{self.host}/{path}").with_tag(ref.tag).with_digest(ref.digest)

    def __str__(self) -> str:
        return f"{self.host}/{self.prefix}" if self.prefix else self.host


@dataclass(frozen=True, slots=True)
class PushOutcome:
    """How pushing one synced image went: status, the target reference, the error of a failure."""

    status: str
    target: str
    error: str = ""
    digest: str = ""  # what the target's tag names (pushed or found present)
    subset_of: str = ""  # the pushed index lists only the cached platforms of this source index

    def subset_note(self) -> str:
        """Return ` (subset index DIGEST of SOURCE)` for a subset index, else ""."""
        return f" (subset index {self.digest} of {self.subset_of})" if self.subset_of else ""


class Publisher:
    """Pushes synced images to their jobs' registry targets; one Pusher per run, so mounts span jobs."""

    def __init__(self, pusher: Pusher) -> None:
        self.pusher = pusher

    async def publish(
        self, target: RegistryTarget, ref: Reference, *, dry_run: bool = False, filtered: bool = False
    ) -> PushOutcome:
        """Push the cached `ref` to `target` unless the target's tag already names its digest.

        `filtered`: the job keeps only some platforms, so an index may be cached incomplete;
        such an index goes as a new index of the cached platforms, or, when the target asks
        for source digests only, fails with a message saying so.
        """
        sink = self.pusher.sink
        try:
            dest = target.reference(ref)
        except MirrorError as exc:
            return PushOutcome(PUSH_FAILED, "", f"push to {target}: {exc}")
        try:
            subset = not target.source_digests_only
            plan = await plan_push(self.pusher.engine.layout, str(ref), subset=subset)
            digest, subset_of = str(plan.top.digest), str(plan.subset_of or "")
            async with self.pusher.engine.host_slot(sink.host(dest)):
                present = await sink.manifest_digest(dest)
            if present == plan.top.digest:
                self.pusher.stats.manifests_present += 1
                # The target's repository holds every blob of it: later pushes of this run to
                # other repositories of the host may mount them from there instead of uploading.
                known = self.pusher.known.setdefault(sink.host(dest), {})
                for blob in plan.blobs:
                    known.setdefault(blob.digest, dest.repository)
                return PushOutcome(PRESENT, str(dest), digest=digest, subset_of=subset_of)
        except StoreError as exc:
            hint = " (the job's platforms filter with source_digests_only)" if filtered else ""
            return PushOutcome(PUSH_FAILED, str(dest), f"push to {dest}: {exc}{hint}")
        except MirrorError as exc:
            return PushOutcome(PUSH_FAILED, str(dest), f"push to {dest}: {exc}")
        if dry_run:
            return PushOutcome(WOULD_PUSH, str(dest), digest=digest, subset_of=subset_of)
        result = await self.pusher.push(str(ref), dest, subset=subset)
        if result.status != "ok":
            return PushOutcome(PUSH_FAILED, str(dest), f"push to {dest}: {result.error}")
        return PushOutcome(PUSHED, str(dest), digest=str(result.digest), subset_of=str(result.subset_of or ""))
