"""Faults between mirror and the real docker-registry, injected by a proxy: every case ends right or clearly.

Right means the exact bytes under the digest name; clearly means one per-image error and
no file under a digest name. A resumed download fetches only the missing bytes (counted
at the proxy).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest

from mirror.auth import RetryPolicy
from mirror.digest import Digest
from mirror.engine.copy import Engine, ImageResult
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.transport import Timeouts, Transport
from tests.conftest import ROOT, Seeded
from tests.faultproxy import Fault, FaultProxy

DEFAULT_TIMEOUTS = Timeouts()
FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05, max_wait=5.0)
BASE_SIZE = 0  # size of the shared base layer of the seeded images, learnt by base_layer()


@pytest.fixture
async def proxy(seeded: Seeded) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy(seeded.registry.host).start()
    yield p
    await p.stop()


async def pull(
    cache: Path, ref: str, *, retry: RetryPolicy = FAST, timeouts: Timeouts = DEFAULT_TIMEOUTS, floor: int = 5
) -> tuple[ImageResult, Engine, Transport]:
    async with Transport(retry=retry, timeouts=timeouts, rate_limit_floor=floor) as transport:
        engine = Engine(Layout.open(cache), limits=transport.limits, retry=retry)
        [result] = await engine.pull_many([(RegistryV2Source(transport), Reference.parse(ref))])
    return result, engine, transport


def base_layer(seeded: Seeded) -> str:
    """Return the digest of the ~300 kB base layer of t/schema2:1 (and set BASE_SIZE to its size)."""
    req = urllib.request.Request(
        f"http://{seeded.registry.host}/v2/t/schema2/manifests/1",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(req) as resp:
        layer = json.load(resp)["layers"][0]
    global BASE_SIZE
    BASE_SIZE = int(layer["size"])
    return str(layer["digest"])


def assert_cached(cache: Path, seeded: Seeded, digest: str) -> None:
    stored = cache / "blobs" / "sha256" / digest.split(":")[1]
    assert stored.read_bytes() == seeded.registry.blob_path(digest).read_bytes()
    assert list((cache / ".mirror" / "ingest").glob("*.partial")) == []


def ref(proxy: FaultProxy) -> str:
    return f"{proxy.host}/t/schema2:1"


@pytest.mark.slow
async def test_dropped_connection_resumes_with_range(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    digest = base_layer(seeded)
    proxy.add(Fault("drop", match=digest, after=100_000))
    result, engine, _ = await pull(tmp_path / "c", ref(proxy))
    assert result.status == "ok", result.error
    assert_cached(tmp_path / "c", seeded, digest)
    assert proxy.ranges == [(f"/v2/t/schema2/blobs/{digest}", "bytes=100000-")]
    assert proxy.bytes_for(digest) == BASE_SIZE  # only the missing bytes came again
    # The engine's byte count is what crossed the wire for blobs, the broken try included.
    assert engine.stats.bytes_fetched == sum(n for p, n in proxy.sent.items() if "/blobs/" in p)


@pytest.mark.slow
async def test_truncated_body_resumes(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    digest = base_layer(seeded)
    proxy.add(Fault("truncate", match=digest, after=120_000), Fault("truncate", match=digest, after=30_000))
    result, _, _ = await pull(tmp_path / "c", ref(proxy))
    assert result.status == "ok", result.error
    assert_cached(tmp_path / "c", seeded, digest)
    assert [r for _, r in proxy.ranges] == ["bytes=120000-", "bytes=150000-"]
    assert proxy.bytes_for(digest) == BASE_SIZE


@pytest.mark.slow
async def test_stalled_body_hits_idle_timeout_and_resumes(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    digest = base_layer(seeded)
    proxy.add(Fault("stall", match=digest, after=50_000))
    result, _, _ = await pull(tmp_path / "c", ref(proxy), timeouts=Timeouts(connect=5, read=0.5, first_byte=5))
    assert result.status == "ok", result.error
    assert_cached(tmp_path / "c", seeded, digest)
    assert [r for _, r in proxy.ranges] == ["bytes=50000-"]
    assert proxy.bytes_for(digest) == BASE_SIZE


@pytest.mark.slow
async def test_server_ignoring_range_restarts_cleanly(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    digest = base_layer(seeded)
    proxy.add(Fault("drop", match=digest, after=100_000), Fault("ignore_range", match=digest))
    result, _, _ = await pull(tmp_path / "c", ref(proxy))
    assert result.status == "ok", result.error
    assert_cached(tmp_path / "c", seeded, digest)
    assert proxy.bytes_for(digest) == 100_000 + BASE_SIZE  # the 200 answer is taken from byte 0


@pytest.mark.slow
async def test_partial_file_of_a_killed_process_is_resumed(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    digest = base_layer(seeded)
    cache = tmp_path / "c"
    layout = Layout.open(cache)
    partial = layout.blobs.partial_path(Digest.parse(digest))
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(seeded.registry.blob_path(digest).read_bytes()[:150_000])
    result, _, _ = await pull(cache, ref(proxy))
    assert result.status == "ok", result.error
    assert_cached(cache, seeded, digest)
    assert [r for _, r in proxy.ranges] == ["bytes=150000-"]
    assert proxy.bytes_for(digest) == BASE_SIZE - 150_000


@pytest.mark.slow
async def test_wrong_bytes_fail_the_image_and_leave_nothing(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    digest = base_layer(seeded)
    proxy.add(*[Fault("corrupt", match=digest, after=1000) for _ in range(3)])
    result, _, _ = await pull(tmp_path / "c", ref(proxy))
    assert result.status == "failed"
    assert f"blob digest mismatch: expected {digest}" in result.error
    assert "\n" not in result.error
    assert not (tmp_path / "c" / "blobs" / "sha256" / digest.split(":")[1]).exists()
    # Blobs cancelled with the failed image keep their partial files; the bad one is gone.
    assert not (tmp_path / "c" / ".mirror" / "ingest" / f"sha256-{digest.split(':')[1]}.partial").exists()


@pytest.mark.slow
async def test_bad_kept_prefix_is_refetched_from_zero(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    digest = base_layer(seeded)
    # A wrong byte in the part received before the break: the resumed file cannot verify.
    proxy.add(Fault("drop", match=digest, after=100_000, corrupt_at=10))
    result, _, _ = await pull(tmp_path / "c", ref(proxy))
    assert result.status == "ok", result.error
    assert_cached(tmp_path / "c", seeded, digest)
    assert proxy.bytes_for(digest) == 100_000 + (BASE_SIZE - 100_000) + BASE_SIZE


@pytest.mark.slow
async def test_endless_drops_give_one_clear_error_and_keep_the_partial(
    seeded: Seeded, proxy: FaultProxy, tmp_path: Path
) -> None:
    digest = base_layer(seeded)
    proxy.add(*[Fault("drop", match=digest, after=10_000) for _ in range(4)])
    result, _, _ = await pull(tmp_path / "c", ref(proxy))
    assert result.status == "failed"
    assert "gave up after 4 attempts" in result.error and "\n" not in result.error
    partial = tmp_path / "c" / ".mirror" / "ingest" / f"sha256-{digest.split(':')[1]}.partial"
    assert partial.stat().st_size == 40_000  # kept for the next run
    assert not (tmp_path / "c" / "blobs" / "sha256" / digest.split(":")[1]).exists()


@pytest.mark.slow
async def test_429_with_retry_after_is_honoured(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    past = format_datetime(datetime(2001, 1, 1, tzinfo=UTC), usegmt=True)
    proxy.add(
        Fault("status", match="/manifests/", status=429, headers={"Retry-After": "0"}),
        Fault("status", match="/blobs/", status=429, headers={"Retry-After": past}),
    )
    # Backoff alone would wait up to an hour: only Retry-After lets this finish.
    slow = RetryPolicy(attempts=3, base=3600, cap=3600, max_wait=5)
    result, _, transport = await pull(tmp_path / "c", ref(proxy), retry=slow)
    assert result.status == "ok", result.error
    assert proxy.statuses(429) == 2
    assert transport.retries == 2


@pytest.mark.slow
async def test_retry_after_beyond_max_wait_fails_at_once(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.add(Fault("status", match="/manifests/", status=429, headers={"Retry-After": "7200"}))
    result, _, _ = await pull(tmp_path / "c", ref(proxy))
    assert result.status == "failed"
    assert result.error == f"GET {proxy.host}/v2/t/schema2/manifests/1: HTTP 429 TOOMANYREQUESTS: injected"


@pytest.mark.slow
async def test_503_burst_is_retried_and_halves_the_host_limit(
    seeded: Seeded, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.add(*[Fault("status", match="/blobs/", status=503) for _ in range(3)])
    result, _, transport = await pull(tmp_path / "c", ref(proxy))
    assert result.status == "ok", result.error
    assert proxy.statuses(503) == 3
    limiter = transport.limits.get(proxy.host)
    assert limiter.decreases == 3
    assert limiter.current < limiter.limit


@pytest.mark.slow
async def test_404_is_not_retried(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    result, _, transport = await pull(tmp_path / "c", f"{proxy.host}/t/none:1")
    assert result.status == "failed"
    assert "not found" in result.error
    assert transport.retries == 0
    assert sum(1 for m, p, _ in proxy.log if "/manifests/" in p) == 1


@pytest.mark.slow
async def test_rate_limit_floor_paces_manifest_gets(
    seeded: Seeded, proxy: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    low = {"RateLimit-Limit": "1000;w=1", "RateLimit-Remaining": "2;w=1"}
    proxy.add(Fault("headers", match="/manifests/", headers=low))
    with caplog.at_level(logging.WARNING, logger="mirror.transport"):
        result, _, transport = await pull(tmp_path / "c", ref(proxy), floor=5)
    assert result.status == "ok", result.error
    assert transport.rate_limits[proxy.host].remaining == 2
    assert any("rate limit 2 of 1000 left (floor 5)" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
async def test_interrupted_process_keeps_its_bytes_for_the_next_run(
    seeded: Seeded, proxy: FaultProxy, tmp_path: Path
) -> None:
    digest = base_layer(seeded)
    # 100 kB, then the body stalls; every resume stalls at once too, so the process keeps
    # retrying (an idle timeout each time) until it is interrupted.
    proxy.add(Fault("stall", match=digest, after=100_000), *(Fault("stall", match=digest) for _ in range(200)))
    cache = tmp_path / "c"
    config = tmp_path / "mirror.toml"
    config.write_text("[engine]\nread_timeout = 0.5\n[retry]\nattempts = 200\nbase = 0.01\ncap = 0.05\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DOCKER_CONFIG": str(tmp_path)}
    cmd = [sys.executable, "-m", "mirror", "pull", "-q", "-c", str(config), "--cache", str(cache), ref(proxy)]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=asyncio.subprocess.PIPE)
    partial = cache / ".mirror" / "ingest" / f"sha256-{digest.split(':')[1]}.partial"

    def kept_bytes() -> int:
        try:
            return partial.stat().st_size
        except FileNotFoundError:
            return 0

    # Polled, not slept: the bytes are in the partial file once the first idle timeout put them aside.
    deadline = time.monotonic() + 60
    while kept_bytes() < 100_000:
        assert proc.returncode is None and time.monotonic() < deadline, "the stalled bytes never reached the disk"
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = await proc.communicate()
    assert proc.returncode == 130, err.decode()
    kept = partial.stat().st_size
    assert kept == 100_000
    proxy.faults.clear()
    proxy.sent.clear()
    result, _, _ = await pull(cache, ref(proxy))
    assert result.status == "ok", result.error
    assert_cached(cache, seeded, digest)
    assert proxy.ranges[-1] == (f"/v2/t/schema2/blobs/{digest}", f"bytes={kept}-")
    assert proxy.bytes_for(digest) == BASE_SIZE - kept


@pytest.mark.slow
async def test_manifest_body_cut_short_is_fetched_again(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.add(Fault("drop", match="/manifests/", after=100), Fault("drop", match="/manifests/", after=10))
    result, _, _ = await pull(tmp_path / "c", ref(proxy))
    assert result.status == "ok", result.error
    assert str(result.digest) == seeded.digests["t/schema2:1"]
    assert sum(1 for m, p, _ in proxy.log if m == "GET" and "/manifests/" in p) == 3


@pytest.mark.slow
async def test_cli_says_when_a_registry_slows_it_down(seeded: Seeded, proxy: FaultProxy, tmp_path: Path) -> None:
    """A 429 with Retry-After is waited out, and `mirror pull` tells the user (even with -q)."""
    proxy.add(Fault("status", match="/manifests/", status=429, headers={"Retry-After": "1"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DOCKER_CONFIG": str(tmp_path)}
    cmd = [sys.executable, "-m", "mirror", "pull", "-q", "--cache", str(tmp_path / "c"), ref(proxy)]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert f"rate limit: {proxy.host} asks us to slow down; pausing its requests 1.0s" in err.decode()
    assert proxy.statuses(429) == 1
