"""Sync jobs whose source is a Docker daemon: list once, compare image ids, export the changed in one call.

A daemon has no manifest digests to HEAD: the image id (`Id` of `GET /images/json`, the
digest of the image's config; before Docker 1.10 the top v1 image's id) stands in for it.
Per wanted `NAME:TAG` the id is compared with the one the state recorded for that cache
name; an unchanged image costs nothing more, and every new or changed image of the job
comes from one `/images/get` export
(`engine.daemon.pull_from_daemon`). Names are normalised as `mirror pull daemon://` does
(`redis` is `docker.io/library/redis`; podman's `localhost/app` stays so), and the cache
names an image by that normalised reference.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import NoReturn

from mirror.engine.copy import FAILED
from mirror.engine.daemon import pull_from_daemon
from mirror.engine.select import matches_any
from mirror.engine.sync import (
    CANCELLED,
    FETCHED,
    IMMUTABLE,
    PLANNED,
    UNCHANGED,
    Syncer,
    SyncJob,
    SyncResult,
)
from mirror.errors import MirrorError, UsageError
from mirror.manifest import Descriptor, Manifest
from mirror.reference import Reference
from mirror.sources.base import BlobBody
from mirror.sources.daemon import DEFAULT_HOST, DaemonClient, DaemonEndpoint, DaemonImage
from mirror.store.state import TagState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DaemonJobSource:
    """The source of a daemon job: which daemon (None: `$DOCKER_HOST` or the socket) and layer compression.

    It stands where a registry job's ManifestSource stands, so `sync` and the daemon take
    it as they take any source; the Syncer hands jobs with it to `sync_daemon_job`.
    """

    url: str | None = None
    compress: bool = False

    def host(self, ref: Reference) -> str:
        """Return the key its limits are counted under: the daemon's address."""
        return self.url or "docker-daemon"

    def _refuse(self) -> NoReturn:
        raise MirrorError("a Docker daemon job is read by export, not by manifest (internal error)")

    async def fetch_manifest(self, ref: Reference) -> Manifest:
        """Refuse: daemon images are exported, never fetched by manifest."""
        self._refuse()

    def open_blob(self, ref: Reference, desc: Descriptor, offset: int = 0) -> AbstractAsyncContextManager[BlobBody]:
        """Refuse: daemon images are exported, never fetched by blob."""
        self._refuse()


def _image_id(text: str) -> str:
    """Return an image id as a digest (`sha256:HEX`; some daemons list the bare hex)."""
    return text if ":" in text else f"sha256:{text}"


def daemon_tags(images: list[DaemonImage]) -> dict[str, dict[str, tuple[str, DaemonImage]]]:
    """Return normalised repository -> tag -> (the name the daemon knows, its image), from `/images/json`."""
    out: dict[str, dict[str, tuple[str, DaemonImage]]] = {}
    for image in images:
        for name in image.repo_tags:
            try:
                ref = Reference.parse(name)
            except UsageError:
                # A name no registry could hold (the same grammar as the command line): never wanted by a job.
                log.warning(
                    "daemon image %s: skipping RepoTag %r: not valid in an image reference", image.id, name[:100]
                )
                continue
            if ref.tag and ref.digest is None:
                out.setdefault(ref.name, {})[ref.tag] = (name, image)
    return out


async def sync_daemon_job(syncer: Syncer, job: SyncJob, source: DaemonJobSource) -> list[SyncResult]:
    """Run one daemon job: a result per wanted image (and per tag gone); a daemon out of reach is one failure."""
    where = f"daemon {source.url or os.environ.get('DOCKER_HOST') or DEFAULT_HOST}"

    async def work() -> list[SyncResult]:
        async with DaemonClient(DaemonEndpoint.resolve(source.url)) as client:
            listed = daemon_tags(await client.images())
            repos = job.repositories.select(sorted(listed) if job.repositories.catalog else None)
            results: list[SyncResult] = []
            export: list[tuple[Reference, str, str]] = []  # (cache reference, daemon's name, image id)
            for repo in repos:
                name = Reference.parse(repo).name
                tags = listed.get(name, {})
                wanted = [Reference.parse(f"{name}:{t}") for t in job.tags.select(sorted(tags))]
                gone = [str(r) for r in syncer.gone_candidates(name, job.name) if r.tag not in tags]
                syncer.observer.job_grew(job.name, len(wanted) + len(gone))
                syncer.planned(job, [str(r) for r in wanted])
                for ref in wanted:
                    key = str(ref)
                    found = tags.get(ref.tag or "")
                    if found is None:
                        err = f"{key}: not found in {client.where}"
                        results.append(await syncer.report(SyncResult(job.name, key, FAILED, error=err)))
                        continue
                    daemon_name, image = found
                    if image.problem:  # its /images/json entry broke the schema: this image alone fails
                        results.append(await syncer.report(SyncResult(job.name, key, FAILED, error=image.problem)))
                        continue
                    image_id = _image_id(image.id)
                    st = syncer.cached_state(key, "")
                    if st is not None and ref.tag and matches_any(ref.tag, job.immutable):
                        results.append(
                            await syncer.report_image(job, ref, SyncResult(job.name, key, IMMUTABLE, st.digest))
                        )
                    elif syncer.stopping.is_set():
                        results.append(await syncer.report(SyncResult(job.name, key, CANCELLED)))
                    elif st is not None and st.digest == image_id:
                        if not syncer.dry_run:
                            await syncer.state.touch_tag(key, time.time())
                        results.append(
                            await syncer.report_image(job, ref, SyncResult(job.name, key, UNCHANGED, image_id))
                        )
                    elif syncer.dry_run:
                        results.append(
                            await syncer.report_image(job, ref, SyncResult(job.name, key, PLANNED, image_id))
                        )
                    else:
                        export.append((ref, daemon_name, image_id))
                if gone:
                    results += await syncer.report_gone(job, sorted(gone))
            if export:
                results += await _export(syncer, job, source, client, export)
            return results

    return await syncer.guard(job, where, work)


async def _export(
    syncer: Syncer,
    job: SyncJob,
    source: DaemonJobSource,
    client: DaemonClient,
    export: list[tuple[Reference, str, str]],
) -> list[SyncResult]:
    """Cache every image of `export` from one `/images/get` call; record and report each."""
    t0, now = time.monotonic(), time.time()
    try:
        pulled = await pull_from_daemon(
            syncer.engine, client, [f"daemon://{name}" for _, name, _ in export], compress=source.compress
        )
    except OSError as exc:  # the cache's disk (full, read-only): every image of the export fails
        err = f"cache {syncer.engine.layout.root}: {exc}"
        return [await syncer.report(SyncResult(job.name, str(ref), FAILED, error=err)) for ref, _, _ in export]
    out = []
    for (ref, _, image_id), res in zip(export, pulled, strict=True):
        key = str(ref)
        if res.status != "ok" or res.digest is None:
            failed = SyncResult(job.name, key, FAILED, seconds=time.monotonic() - t0, error=res.error or "failed")
            out.append(await syncer.report(failed))
            continue
        # The pulled image is cached under the daemon's name normalised: the same reference as `key`.
        await syncer.state.record_tag(TagState(key, job.name, image_id, str(res.digest), "", now, time.time()))
        fetched = SyncResult(job.name, key, FETCHED, image_id, res.platforms, res.bytes, time.monotonic() - t0)
        out.append(await syncer.report_image(job, ref, fetched))
    return out
