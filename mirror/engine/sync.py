"""Incremental sync: many jobs, one engine; a HEAD per tag decides whether anything is fetched.

For each wanted tag the manifest digest the registry reports (`HEAD /v2/NAME/manifests/TAG`,
distribution spec "Checking if content exists") is compared with what the cache's state
says it holds: an unchanged tag costs that one HEAD and no GET, and a tag matching an
immutable pattern that is already cached costs nothing. All jobs of a run share the
engine, so a blob wanted by many repositories is fetched once and the per-host limits
hold across jobs.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

from mirror.digest import Digest
from mirror.engine.copy import FAILED, Engine, ImageResult
from mirror.engine.fanout import Window, fan_out
from mirror.engine.publish import PUSH_FAILED, PUSHED, WOULD_PUSH, Publisher, RegistryTarget
from mirror.engine.referrers import FETCHED as FETCHED_REFERRER
from mirror.engine.referrers import UNCHANGED as UNCHANGED_REFERRER
from mirror.engine.referrers import cache_referrers
from mirror.engine.select import RepoFilter, TagFilter, matches_any
from mirror.errors import MirrorError, NotFoundError
from mirror.manifest import Manifest, Platform
from mirror.reference import Reference
from mirror.referrers import cosign_tags, is_referrer_tag
from mirror.sources.base import ManifestSource
from mirror.store.state import StateDB, TagState

# Statuses of a SyncResult. Only `failed` makes a run fail.
FETCHED = "ok"  # new or changed upstream, now cached
UNCHANGED = "unchanged"  # the HEAD digest is the cached one
IMMUTABLE = "immutable"  # cached, and its tag is never re-checked
PLANNED = "planned"  # dry run: would be fetched
DELETED = "deleted"  # cached, no longer listed upstream, kept
PRUNED = "pruned"  # no longer listed upstream, removed from the cache's index
CANCELLED = "cancelled"  # not started: the process is stopping

WINDOW_FACTOR = 4  # tags in flight per unit of the engine's concurrency

_E = TypeVar("_E", "SyncResult", "SyncResult | str")


@runtime_checkable
class TagLister(Protocol):
    """A source that lists tags of a repository and repositories of a host (v2 `tags/list`, `_catalog`)."""

    async def tags(self, ref: Reference) -> list[str]:
        """Return every tag of `ref`'s repository."""
        ...

    async def catalog(self, host: str) -> list[str]:
        """Return every repository the host lists."""
        ...


@runtime_checkable
class ManifestHeader(Protocol):
    """A source that reports a manifest's digest without sending it (v2 `HEAD .../manifests/TAG`)."""

    async def head_manifest(self, ref: Reference) -> Digest | None:
        """Return the digest the source reports for `ref`, None when it does not say."""
        ...


@runtime_checkable
class WholeImagePuller(Protocol):
    """A source whose images are copied whole by an engine of their own (v1), not manifest by manifest.

    `pull` returns the result and the token the state records for the tag: what
    `head_manifest` answers for it on the next run when nothing changed.
    """

    async def pull(self, engine: Engine, ref: Reference, platforms: tuple[Platform, ...]) -> tuple[ImageResult, str]:
        """Copy `ref` into the cache; return the result and the state token."""
        ...


@dataclass(frozen=True, slots=True)
class SyncJob:
    """What one job copies: repositories and tags of one registry, platforms, immutable tags, pruning."""

    name: str
    registry: str
    repositories: RepoFilter
    tags: TagFilter = field(default_factory=TagFilter)
    platforms: tuple[Platform, ...] = ()
    immutable: tuple[re.Pattern[str], ...] = ()
    prune: bool = False
    destination: RegistryTarget | None = None  # None: the cache only; else pushed on from the cache
    referrers: bool = False  # also cache each image's signatures, SBOMs, attestations (engine.referrers)


@dataclass(frozen=True, slots=True)
class SyncResult:
    """How one reference (or, for a listing failure, one repository or registry) went."""

    job: str
    reference: str
    status: str
    digest: str = ""
    platforms: tuple[str, ...] = ()
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    pushed: str = ""  # with a registry destination: a publish status (pushed, present, would push, failed)
    target: str = ""  # the destination reference it was pushed to
    referrer_of: str = ""  # for a referrer (signature, SBOM): the `HOST/R@DIGEST` it refers to
    foreign: int = 0  # foreign layers kept as references, not fetched
    subset_index: str = ""  # pushed as a new index of the cached platforms: its digest (`digest` is the source's)

    def to_json(self) -> dict[str, Any]:
        """Return the report entry: reference, digest, status, bytes, seconds, error (and job)."""
        extra: dict[str, Any] = {"referrer_of": self.referrer_of} if self.referrer_of else {}
        if self.foreign:
            extra["foreign_layers"] = self.foreign
        if self.subset_index:
            extra["subset_index"] = self.subset_index
        return {
            "job": self.job,
            "reference": self.reference,
            "digest": self.digest or None,
            "status": self.status,
            "platforms": list(self.platforms),
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "error": self.error or None,
            "push": self.pushed or None,
            "destination": self.target or None,
            **extra,
        }


Entry = SyncResult | str  # a result kept whole, or (counted, not kept) only its status


@dataclass(slots=True)
class SyncRun:
    """What a run's results add up to: counts per status and totals over every result, and the results kept.

    `results` holds every result when the run was asked to keep them all (`--report`, the
    tests), else only the failed ones: a 100,000-tag run keeps a few numbers, not 100,000
    objects. Counts are in the order each status first occurs among the results.
    """

    results: list[SyncResult]
    counts: dict[str, int]
    total: int = 0
    bytes: int = 0
    foreign: int = 0  # foreign layers kept as references, not fetched
    pushes: int = 0  # results with a publish status (a registry destination)

    @classmethod
    def of(cls, results: list[SyncResult]) -> SyncRun:
        """Return the run made of `results`, every one kept."""
        out = cls([], {})
        for r in results:
            out.add(r, keep=True)
        return out

    def add(self, result: Entry, *, keep: bool) -> None:
        """Count `result` (a result, or only its status with no bytes or push); keep it when `keep`."""
        if isinstance(result, str):
            self.counts[result] = self.counts.get(result, 0) + 1
            self.total += 1
            return
        self.counts[result.status] = self.counts.get(result.status, 0) + 1
        self.total += 1
        self.bytes += result.bytes
        self.foreign += result.foreign
        self.pushes += bool(result.pushed)
        if keep:
            self.results.append(result)

    @property
    def failed(self) -> list[SyncResult]:
        """Return the failed results (always kept)."""
        return [r for r in self.results if r.status == FAILED]

    @property
    def unreachable(self) -> bool:
        """Return whether every result failed, each because its endpoint could not be reached."""
        failed = self.failed
        return bool(failed) and len(failed) == self.total and all(r.error.startswith("cannot reach") for r in failed)


class SyncObserver(Protocol):
    """What a sync reports while it works (the CLI and the daemon show or count it)."""

    def job_grew(self, job: str, images: int) -> None:
        """`images` more references of `job` are known to be wanted."""

    def result(self, result: SyncResult) -> None:
        """One reference is done."""


@runtime_checkable
class PlanObserver(Protocol):
    """A SyncObserver that also wants the run id and the names of planned references (for a stopped run's report)."""

    def run_started(self, run: int) -> None:
        """The run is recorded in the state under `run` (0: a dry run, not recorded)."""

    def planned(self, job: str, references: Sequence[str]) -> None:
        """`references` of `job` (one repository's) are wanted; each gets a result unless the run is cancelled."""


class NoObserver:
    """A SyncObserver that shows nothing."""

    def job_grew(self, job: str, images: int) -> None:
        """Ignore."""

    def result(self, result: SyncResult) -> None:
        """Ignore."""


@functools.lru_cache(maxsize=256)  # asked once per tag; a run has a few jobs
def platform_key(platforms: tuple[Platform, ...]) -> str:
    """Return the platforms a job keeps, as stored in the state (empty: all)."""
    return ",".join(sorted(str(p) for p in platforms))


_ABILITIES: dict[tuple[type, type], bool] = {}


def _can(source: object, ability: type) -> bool:
    """Return `isinstance(source, ability)` for a runtime-checkable Protocol, decided once per class of source.

    typing's Protocol check looks every member up on the object, tens of microseconds a
    call, and the no-op check asks it per tag; a source's abilities come from its class.
    """
    key = (type(source), ability)
    known = _ABILITIES.get(key)
    if known is None:
        known = _ABILITIES[key] = isinstance(source, ability)
    return known


class Syncer:
    """Runs sync jobs against one Engine and one state file; one failing image never stops the rest."""

    def __init__(
        self,
        engine: Engine,
        state: StateDB,
        *,
        run: int = 0,
        dry_run: bool = False,
        stopping: asyncio.Event | None = None,
        observer: SyncObserver | None = None,
        publisher: Publisher | None = None,
        keep_all: bool = False,
    ) -> None:
        self.engine = engine
        self.keep_all = keep_all  # keep every result, not only the failed ones (see SyncRun)
        self._dropped = SyncRun([], {})  # bytes, foreign layers and pushes of the results not kept
        self.publisher = publisher
        self.state = state
        self.run_id = run
        self.dry_run = dry_run
        self.stopping = stopping or asyncio.Event()
        self.observer: SyncObserver = observer or NoObserver()
        self._states: dict[str, TagState] = {}
        self._entries: dict[str, str] = {}
        # Repository -> the keys (`str(ref)`, `NAME:TAG`) of its cached tags: strings, not a
        # Reference each (~200 bytes a tag, held for the whole run).
        self._by_repo: dict[str, list[str]] = {}
        self._referrers: list[Entry] = []  # a result per referrer looked up, reported as it lands
        self._reported: set[str] = set()  # referrer names already reported (two tags of one image)
        # Tags (and repositories) in flight across the whole run: a few times the engine's
        # concurrency keeps every connection busy, and memory stays flat however many tags.
        self.tags_window = Window(WINDOW_FACTOR * engine.concurrency)
        self.repos_window = Window(WINDOW_FACTOR * engine.concurrency)

    async def run(self, jobs: Sequence[tuple[SyncJob, ManifestSource]]) -> SyncRun:
        """Run every job at once; return the counts over one result per reference (and per listing failure)."""
        self._states = await self.state.tags()
        layout = self.engine.layout
        if (layout.root / "index.json").exists():  # a dry run may look at a cache not made yet
            self._entries = await layout.digests()
        for name in self._entries:
            ref = _parse_or_none(name)
            if ref is not None and ref.tag and ref.digest is None:
                key = str(ref)
                self._by_repo.setdefault(ref.name, []).append(name if key == name else key)
        # The run's own scope: it waits for its own downloads only, never another run's.
        try:
            # index.json is written in growing batches while the run goes on, and whole by its end.
            async with layout.batched(), self.engine.run_scope():
                parts = await fan_out(self._job(job, source) for job, source in jobs)
        finally:
            stats = self.engine.stats
            stats.tags_peak = max(stats.tags_peak, self.tags_window.peak)
        d = self._dropped
        out = SyncRun([], {}, bytes=d.bytes, foreign=d.foreign, pushes=d.pushes)
        # In the order of the plan (jobs, repositories, tags), referrers last: what every output shows.
        for part in parts:
            for r in part:
                out.add(r, keep=True)
        for r in self._referrers:
            out.add(r, keep=True)
        return out

    def _slim(self, result: Entry) -> Entry:
        """Return `result` as the run keeps it: whole when kept, else only its status (its sums counted now)."""
        if isinstance(result, str) or self.keep_all or result.status == FAILED:
            return result
        self._dropped.add(result, keep=False)
        return result.status

    async def _guard(self, job: SyncJob, name: str, work: Callable[[], Awaitable[list[_E]]]) -> list[_E]:
        """Run `work`; a MirrorError becomes one failed result for `name`."""
        t0 = time.monotonic()
        try:
            return await work()
        except MirrorError as exc:
            return [await self._done(SyncResult(job.name, name, FAILED, seconds=time.monotonic() - t0, error=str(exc)))]

    async def _job(self, job: SyncJob, source: ManifestSource) -> list[Entry]:
        from mirror.engine.sync_daemon import DaemonJobSource, sync_daemon_job

        if isinstance(source, DaemonJobSource):  # a Docker daemon: listed once, exported in one call
            return [self._slim(r) for r in await sync_daemon_job(self, job, source)]

        async def work() -> list[Entry]:
            catalog: list[str] | None = None
            if job.repositories.catalog:
                if not isinstance(source, TagLister):
                    raise MirrorError(f"job {job.name}: its source cannot list repositories (_catalog)")
                # Distribution spec "Listing Repositories" (`GET /v2/_catalog`), asked of the
                # API host (registry-1.docker.io for docker.io).
                api_host = Reference(job.registry, "_catalog").api_host
                async with self.engine.host_slot(api_host):
                    catalog = await source.catalog(api_host)
            repos = job.repositories.select(catalog)
            parts = await fan_out((self._repo(job, source, repo) for repo in repos), self.repos_window)
            return [r for part in parts for r in part]

        return await self._guard(job, job.registry, work)

    async def _repo(self, job: SyncJob, source: ManifestSource, repo: str) -> list[Entry]:
        async def work() -> list[Entry]:
            base = Reference.parse(f"{job.registry}/{repo}")
            listed: list[str] | None = None
            if job.tags.needs_listing:
                if not isinstance(source, TagLister):
                    raise MirrorError(f"job {job.name}: its source cannot list the tags of {base.name}")
                # Distribution spec "Listing Tags" (`GET /v2/NAME/tags/list`, paginated by Link).
                async with self.engine.host_slot(source.host(base)):
                    listed = await source.tags(base)
            wanted = job.tags.select(listed or [])
            if job.referrers and listed is not None:
                # Signature and fallback-index tags come with the image they refer to, as its referrers.
                wanted = [t for t in wanted if not is_referrer_tag(t)]
            gone: list[str] = []
            if listed is not None:
                # Cached tags of this repository that the registry no longer lists.
                cached = self._by_repo.get(base.name, [])
                upstream = set(listed) if cached else set()
                gone = [key for key in cached if _tag_of(key) not in upstream]
                del listed, upstream  # not kept for the whole run: ~100 bytes a tag
            self.observer.job_grew(job.name, len(wanted) + len(gone))
            if isinstance(self.observer, PlanObserver):  # a name per tag only for an observer that keeps them
                self.observer.planned(job.name, [f"{base.name}:{t}" for t in wanted])  # str(base.with_tag(t))
            # A Reference per tag only while the tag is in flight (drawn as the window frees a place).
            tags = (self._tag(job, source, base.with_tag(t)) for t in wanted)
            results = await fan_out(tags, self.tags_window)
            if gone:
                results += [self._slim(r) for r in await self._gone(job, sorted(gone))]
            return results

        return await self._guard(job, f"{job.registry}/{repo}", work)

    async def _gone(self, job: SyncJob, names: list[str]) -> list[SyncResult]:
        """Report tags deleted upstream; with `prune`, drop them from index.json and the state."""
        status = PRUNED if job.prune and not self.dry_run else DELETED
        if status == PRUNED:
            await self.engine.layout.remove_refs(set(names))
            await self.state.forget_tags(names)
        out = []
        for name in names:
            st = self._states.get(name)
            digest = st.digest if st else self._entries.get(name, "")
            out.append(await self._done(SyncResult(job.name, name, status, digest)))
        return out

    async def _tag(self, job: SyncJob, source: ManifestSource, ref: Reference) -> Entry:
        """Check one tag and copy it when needed; any error becomes a failed result of its own."""
        t0 = time.monotonic()
        try:
            return self._slim(await self._check_and_copy(job, source, ref, t0))
        except (MirrorError, OSError) as exc:
            # OSError: the cache's disk (full, read-only); reported per image like any other failure.
            err = str(exc) if isinstance(exc, MirrorError) else f"cache {self.engine.layout.root}: {exc}"
            return await self._done(SyncResult(job.name, str(ref), FAILED, seconds=time.monotonic() - t0, error=err))

    async def _check_and_copy(self, job: SyncJob, source: ManifestSource, ref: Reference, t0: float) -> SyncResult:
        key = str(ref)
        plats = platform_key(job.platforms)
        st = self._states.get(key)
        entry = self._entries.get(key)
        cached = st is not None and entry is not None and entry == st.entry_digest and st.platforms == plats
        if cached and st is not None and job.immutable and ref.tag and matches_any(ref.tag, job.immutable):
            immutable = SyncResult(job.name, key, IMMUTABLE, st.digest)
            if job.destination is None:  # nothing to publish; referrers are looked up only for a pushed image
                return await self._done(immutable)
            image = await self._done(await self._publish(job, ref, immutable))
            await self._referrers_after(job, source, ref, image, None)
            return image
        if self.stopping.is_set():
            return await self._done(SyncResult(job.name, key, CANCELLED))
        top: Manifest | None = None  # fetched already when the HEAD did not name the digest
        try:
            upstream: Digest | None = None
            # A tag not cached yet is fetched without a HEAD first (a dry run still asks, to show the digest).
            if _can(source, ManifestHeader) and (cached or self.dry_run):
                async with self.engine.host_slot(source.host(ref)):
                    upstream = await cast(ManifestHeader, source).head_manifest(ref)
                if upstream is None and cached and not _can(source, WholeImagePuller):
                    # The registry's HEAD omits Docker-Content-Digest: GET the top manifest and hash
                    # it, rather than copying the image again (and rewriting index.json) every run.
                    top = await self.engine.manifest(source, ref)
                    upstream = top.digest
            now = time.time()
            if cached and st is not None and upstream is not None and str(upstream) == st.digest:
                found: list[SyncResult] | None = None
                if not self.dry_run:
                    await self.state.touch_tag(key, now)
                    if job.referrers:
                        found = await self._signature_check(job, source, ref, Digest.parse(st.digest))
                unchanged = SyncResult(job.name, key, UNCHANGED, st.digest, seconds=time.monotonic() - t0)
                if job.destination is None and found is None:  # the common no-op: nothing to publish or report
                    return await self._done(unchanged)
                image = await self._done(await self._publish(job, ref, unchanged))
                await self._referrers_after(job, source, ref, image, found)
                return image
            if self.dry_run:
                planned = SyncResult(job.name, key, PLANNED, str(upstream or ""))
                return await self._done(await self._publish(job, ref, planned))
            if self.stopping.is_set():
                return await self._done(SyncResult(job.name, key, CANCELLED, str(upstream or "")))
        except NotFoundError as exc:
            return await self._done(
                SyncResult(job.name, key, FAILED, seconds=time.monotonic() - t0, error=f"{key}: not found ({exc})")
            )
        token = ""
        if isinstance(source, WholeImagePuller):
            res, token = await source.pull(self.engine, ref, job.platforms)
        else:
            res = await self.engine.pull(source, ref, job.platforms, top=top)
        if res.status != "ok" or res.digest is None:
            return await self._done(
                SyncResult(job.name, key, FAILED, seconds=time.monotonic() - t0, error=res.error or "failed")
            )
        desc = res.entry or await self.engine.layout.find(key)
        await self.state.record_tag(
            TagState(key, job.name, token or str(res.digest), str(desc.digest) if desc else "", plats, now, time.time())
        )
        fetched = SyncResult(
            job.name,
            key,
            FETCHED,
            str(res.digest),
            res.platforms,
            res.bytes,
            time.monotonic() - t0,
            foreign=res.foreign,
        )
        found = await self._cache_referrers(job, source, ref, res.digest) if job.referrers else None
        image = await self._done(await self._publish(job, ref, fetched))
        await self._referrers_after(job, source, ref, image, found)
        return image

    async def _signature_check(
        self, job: SyncJob, source: ManifestSource, ref: Reference, digest: Digest
    ) -> list[SyncResult] | None:
        """For an unchanged tag: one HEAD of its cosign `.sig` tag; a new or changed one looks referrers up again.

        The full lookup (referrers API or fallback tag, and every cosign tag) runs when a tag is
        fetched; this keeps a no-op run at two HEADs per tag while still catching the common
        case of an image signed after it was first mirrored. Returns the referrers the lookup
        found (see `_cache_referrers`), None when it did not run.
        """
        if not _can(source, ManifestHeader):
            return None
        sig = ref.with_tag(cosign_tags(digest)[0])
        try:
            async with self.engine.host_slot(source.host(ref)):
                upstream = await cast(ManifestHeader, source).head_manifest(sig)
        except NotFoundError:
            return None
        if upstream is not None and self._entries.get(str(sig)) != str(upstream):
            return await self._cache_referrers(job, source, ref, digest)
        return None

    async def _cache_referrers(
        self, job: SyncJob, source: ManifestSource, ref: Reference, digest: Digest
    ) -> list[SyncResult]:
        """Cache the referrers of `ref`'s manifest `digest`; return a result for each not yet reported this run.

        The results are not reported yet: `_referrers_after` does, once the image is published.
        """
        out = []
        for r in await cache_referrers(self.engine, source, ref, digest):
            if r.name in self._reported:
                continue
            self._reported.add(r.name)
            self.observer.job_grew(job.name, 1)  # one more line than the job's tags
            status = {FETCHED_REFERRER: FETCHED, UNCHANGED_REFERRER: UNCHANGED}.get(r.status, FAILED)
            out.append(
                SyncResult(job.name, r.name, status, r.digest, (), r.bytes, r.seconds, r.error, referrer_of=r.subject)
            )
        return out

    async def _referrers_after(
        self, job: SyncJob, source: ManifestSource, ref: Reference, image: SyncResult, found: list[SyncResult] | None
    ) -> None:
        """Report the referrers `found` for `image` (None: not looked up), publishing them after it.

        With a registry destination a referrer is published (one HEAD at the target, pushed
        when it lacks it) when it was fetched now, or when its image was fetched or pushed
        (the target lacked the image, so it lacks its referrers too: an image found unchanged
        upstream has its referrers looked up for that). A referrer unchanged beside an image
        unchanged and `present` at the target went there with it: it costs nothing. After a
        failed image push its referrers are not pushed either; the next run pushes them with it.
        """
        pushed = image.pushed == PUSHED  # the target lacked the image (never so in a dry run)
        if found is None and job.referrers and pushed and image.digest and not self.stopping.is_set():
            found = await self._cache_referrers(job, source, ref, Digest.parse(image.digest))
        publish = image.status == FETCHED or pushed
        go_on = job.destination is not None and image.pushed not in (PUSH_FAILED, CANCELLED)
        for r in found or ():
            if go_on and r.status != FAILED and (publish or r.status == FETCHED):
                r = await self._publish(job, Reference.parse(r.reference), r, filtered=False)
            self._referrers.append(self._slim(await self._done(r)))

    async def _publish(
        self, job: SyncJob, ref: Reference, result: SyncResult, *, filtered: bool | None = None
    ) -> SyncResult:
        """Push a cached (or, in a dry run, planned) image on to the job's registry destination.

        A push failure fails this image only; the cache keeps it, and the next run tries again.
        """
        target = job.destination
        if target is None:
            return result
        if result.status == PLANNED:  # dry run, not cached yet: it would be fetched, then pushed
            return replace(result, pushed=WOULD_PUSH, target=str(target.reference(ref)))
        if self.stopping.is_set():
            return replace(result, pushed=CANCELLED, target=str(target.reference(ref)))
        if self.publisher is None:
            err = f"job {job.name}: a registry destination needs a publisher (internal error)"
            return replace(result, status=FAILED, error=err)
        t0 = time.monotonic()
        cut = bool(job.platforms) if filtered is None else filtered  # referrers are cached whole
        got = await self.publisher.publish(target, ref, dry_run=self.dry_run, filtered=cut)
        result = replace(
            result,
            pushed=got.status,
            target=got.target,
            seconds=result.seconds + time.monotonic() - t0,
            subset_index=got.digest if got.subset_of else "",
        )
        return replace(result, status=FAILED, error=got.error) if got.status == PUSH_FAILED else result

    # --- what other job kinds (engine.sync_daemon) build on ---------------------------------

    def cached_state(self, key: str, platforms: str) -> TagState | None:
        """Return the state of `key` when the cache still holds what it recorded (same entry, same platforms)."""
        st = self._states.get(key)
        entry = self._entries.get(key)
        return (
            st
            if st is not None and entry is not None and entry == st.entry_digest and st.platforms == platforms
            else None
        )

    def gone_candidates(self, repository: str, job: str) -> list[Reference]:
        """Return the cached tags of `repository` (a normalised name) that job `job` recorded."""
        keys = self._by_repo.get(repository, [])
        return [Reference.parse(k) for k in keys if (st := self._states.get(k)) and st.job == job]

    async def guard(self, job: SyncJob, name: str, work: Callable[[], Awaitable[list[SyncResult]]]) -> list[SyncResult]:
        """Run `work`; a MirrorError becomes one failed result for `name`."""
        return await self._guard(job, name, work)

    def planned(self, job: SyncJob, references: Sequence[str]) -> None:
        """Tell a PlanObserver the references of `job` that are wanted."""
        if isinstance(self.observer, PlanObserver):
            self.observer.planned(job.name, references)

    async def report(self, result: SyncResult) -> SyncResult:
        """Record a failure in the state, tell the observer; return `result`."""
        return await self._done(result)

    async def report_image(self, job: SyncJob, ref: Reference, result: SyncResult) -> SyncResult:
        """Push a cached image on to the job's destination (if any), then report it."""
        return await self._done(await self._publish(job, ref, result))

    async def report_gone(self, job: SyncJob, names: list[str]) -> list[SyncResult]:
        """Report tags no longer at the source; with `prune`, drop them from the cache's index and state."""
        return await self._gone(job, names)

    async def _done(self, result: SyncResult) -> SyncResult:
        if result.status == FAILED and not self.dry_run:
            await self.state.record_error(self.run_id, result.job, result.reference, result.error)
        self.observer.result(result)
        return result


def _tag_of(key: str) -> str:
    """Return the tag of `NAME:TAG` (a tag has no colon)."""
    return key.rpartition(":")[2]


def _parse_or_none(name: str) -> Reference | None:
    try:
        return Reference.parse(name)
    except MirrorError:
        return None


def summarize(results: Sequence[SyncResult]) -> dict[str, int]:
    """Return how many results have each status."""
    out: dict[str, int] = {}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    return out


async def sync(
    engine: Engine,
    state: StateDB,
    jobs: Sequence[tuple[SyncJob, ManifestSource]],
    *,
    dry_run: bool = False,
    stopping: asyncio.Event | None = None,
    observer: SyncObserver | None = None,
    publisher: Publisher | None = None,
    keep_all: bool = False,
) -> tuple[int, SyncRun]:
    """Run `jobs` as one recorded run; return the run id and its results (every one with `keep_all`, else the failed).

    The one entry point `mirror sync`, the daemon and the tests share. Jobs with a registry
    destination push through `publisher` (`Config.publisher` builds one). Every result is
    shown to `observer` as it lands, whatever is kept.
    """
    run = 0 if dry_run else await state.start_run(j.name for j, _ in jobs)
    if isinstance(observer, PlanObserver):
        observer.run_started(run)
    try:
        results = await Syncer(
            engine,
            state,
            run=run,
            dry_run=dry_run,
            stopping=stopping,
            observer=observer,
            publisher=publisher,
            keep_all=keep_all,
        ).run(jobs)
    except asyncio.CancelledError:
        if not dry_run:
            await state.finish_run(run, "cancelled", 0, 0, 0)
        raise
    except Exception:
        # A bug (not a MirrorError): every branch of the run has stopped (fan_out); say it ended.
        if not dry_run:
            await state.finish_run(run, "error", 0, 0, 0)
        raise
    if not dry_run:
        failed = results.counts.get(FAILED, 0)
        outcome = "ok" if not failed else ("failed" if failed == results.total else "partial")
        await state.finish_run(run, outcome, results.total, failed, results.bytes)
    return run, results
