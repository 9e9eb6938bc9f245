"""Blob GETs on the transport's lean path (`mirror.http1`): exact bytes over kept-alive connections, and
everything unusual sent through aiohttp as before.

The real docker-registry answers the common cases (plain HTTP, a Range, Bearer tokens, TLS with a
client certificate, a proxy in between); a http_loopback server of the tests' own answers what no real
registry does (a body cut short, longer than its length, stalled, chunked or malformed, headers past
the bound, a redirect, a challenge, an overloaded answer, a connection closed between requests).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from mirror import config
from mirror.auth import RetryPolicy
from mirror.credentials import Credential, CredentialStore
from mirror.digest import Digest
from mirror.engine.copy import Engine
from mirror.errors import MirrorError, NotFoundError, StreamError
from mirror.http1 import MAX_BODY_BUFFER, MAX_HEADER_BYTES
from mirror.manifest import DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_SCHEMA2, Descriptor, ImageManifest
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.transport import Timeouts, Transport
from tests.conftest import Seeded
from tests.httploop import Handler, Loopback
from tests.test_auth_bearer import TokenRegistry, bearer, issuer  # noqa: F401 - the Bearer registry fixtures
from tests.test_proxy import TinyProxy, through, tinyproxy  # noqa: F401 - the tinyproxy fixture
from tests.test_transport_tls import TlsRegistry, tls_registry  # noqa: F401 - the TLS registry fixture
from tests.tokenissuer import TokenIssuer

NO_DOCKER = CredentialStore(use_docker_config=False)
ONCE = RetryPolicy(attempts=1)
FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05, max_wait=5.0)


async def blobs_of(transport: Transport, ref: str) -> list[Descriptor]:
    """Return the config and layers of the image `ref` names (one platform's, for an index: its first)."""
    source = RegistryV2Source(transport)
    manifest = await source.fetch_manifest(Reference.parse(ref))
    assert isinstance(manifest, ImageManifest), ref
    assert manifest.config is not None
    return [manifest.config, *manifest.layers]


async def read_blob(transport: Transport, ref: str, desc: Descriptor, offset: int = 0) -> tuple[int, bytes]:
    """Return (the offset the answer starts at, its bytes) of blob `desc` of `ref`'s repository."""
    async with RegistryV2Source(transport).open_blob(Reference.parse(ref), desc, offset) as body:
        return body.offset, b"".join([chunk async for chunk in body.chunks])


def digest_of(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


async def test_lean_gets_fetch_exact_blobs_over_one_connection(seeded: Seeded) -> None:
    ref = seeded.ref("t/schema2:1")
    async with Transport(credentials=NO_DOCKER) as lean, Transport(credentials=NO_DOCKER, lean_get=False) as full:
        descs = await blobs_of(full, ref)
        before = lean.requests
        for _ in range(2):
            for desc in descs:
                offset, data = await read_blob(lean, ref, desc)
                assert offset == 0 and len(data) == desc.size
                assert digest_of(data) == desc.digest
                assert (offset, data) == await read_blob(full, ref, desc)
        assert lean.lean_connections == 1  # one kept-alive connection carried every GET
        assert full.lean_connections == 0
        assert lean.requests - before == 2 * len(descs)  # each GET once: nothing sent again through aiohttp


async def test_a_range_is_answered_206_on_the_lean_path(seeded: Seeded) -> None:
    ref = seeded.ref("t/oci:1")
    async with Transport(credentials=NO_DOCKER) as t:
        descs = await blobs_of(t, ref)
        layer = max(descs, key=lambda d: d.size)
        whole = (await read_blob(t, ref, layer))[1]
        offset, rest = await read_blob(t, ref, layer, 1000)
        assert offset == 1000 and rest == whole[1000:]
        assert t.lean_connections == 1


async def test_concurrent_gets_share_a_few_connections_and_a_missing_blob_is_not_found(seeded: Seeded) -> None:
    ref = seeded.ref("t/schema2:1")
    async with Transport(credentials=NO_DOCKER) as t:
        descs = await blobs_of(t, ref)
        got = await asyncio.gather(*(read_blob(t, ref, d) for d in descs * 4))
        assert [digest_of(data) for _, data in got] == [d.digest for d in descs * 4]
        assert 1 <= t.lean_connections <= 4 * len(descs)
        missing = Descriptor(DOCKER_LAYER_GZIP, digest_of(b"no such blob"), 12)
        with pytest.raises(NotFoundError, match=r"GET .*/v2/t/schema2/blobs/sha256:[0-9a-f]{64}: not found \(") as exc:
            await read_blob(t, ref, missing)
        assert "\n" not in str(exc.value)


async def test_manifest_gets_go_lean_and_a_missing_tag_is_the_same_error_either_way(seeded: Seeded) -> None:
    names = sorted(seeded.digests)
    errors = []
    for lean in (True, False):
        async with Transport(credentials=NO_DOCKER, lean_get=lean, lean_head=False) as t:
            source = RegistryV2Source(t)
            for name in names:
                manifest = await source.fetch_manifest(Reference.parse(seeded.ref(name)))
                assert str(manifest.digest) == seeded.digests[name]
            with pytest.raises(NotFoundError) as exc:
                await source.fetch_manifest(Reference.parse(seeded.ref("t/schema2:no-such-tag")))
            errors.append(str(exc.value))
            assert t.lean_connections == (1 if lean else 0)
            assert t.requests == len(names) + 1
    assert errors[0] == errors[1]
    assert "MANIFEST_UNKNOWN" in errors[0] and "\n" not in errors[0]


async def test_pull_through_the_engine_uses_the_lean_path(seeded: Seeded, tmp_path: Path) -> None:
    async with Transport(credentials=NO_DOCKER) as t:
        engine = Engine(Layout.open(tmp_path / "c"), limits=t.limits)
        results = await engine.pull_many([(RegistryV2Source(t), Reference.parse(seeded.ref("t/schema2:1")))])
        assert [r.status for r in results] == ["ok"]
        assert t.lean_connections >= 1
        for desc in await blobs_of(t, seeded.ref("t/schema2:1")):
            stored = tmp_path / "c" / "blobs" / "sha256" / desc.digest.hex
            assert stored.read_bytes() == seeded.registry.blob_path(str(desc.digest)).read_bytes()


async def test_bearer_tokens_go_on_the_lean_path_after_the_first_challenge(
    bearer: TokenRegistry,  # noqa: F811 - the fixture imported above
    issuer: TokenIssuer,  # noqa: F811
) -> None:
    host = bearer.registry.host
    doc = {"registries": [{"host": host, "username": "alice", "password": "alice-Pa55"}]}
    async with config.parse({**doc, "auth": {"use_docker_config": False}}, "t.toml").transport() as t:
        ref = bearer.ref("team/app:1")
        descs = await blobs_of(t, ref)  # the manifest GET answers the challenge: a token is cached
        before = t.requests
        for desc in descs:
            assert digest_of((await read_blob(t, ref, desc))[1]) == desc.digest
        assert t.requests - before == len(descs)  # no 401 round any more
        assert t.lean_connections == 1
        assert len([r for r in issuer.requests if r.user == "alice"]) == 1  # one token, reused


@pytest.mark.slow
async def test_lean_gets_over_tls_with_a_client_certificate(
    tls_registry: TlsRegistry,  # noqa: F811 - the fixture imported above
) -> None:
    doc = tls_registry.config()
    async with config.parse(doc, "t.toml").transport() as t:
        descs = await blobs_of(t, tls_registry.ref)
        for _ in range(2):
            for desc in descs:
                assert digest_of((await read_blob(t, tls_registry.ref, desc))[1]) == desc.digest
        assert t.lean_connections == 1


@pytest.mark.slow
async def test_a_proxy_keeps_gets_on_aiohttps_path(
    seeded: Seeded,
    tinyproxy: TinyProxy,  # noqa: F811 - the fixture imported above
) -> None:
    host = seeded.registry.host
    tinyproxy.clear()
    async with through(host, tinyproxy.url) as t:
        ref = seeded.ref("t/oci:1")
        descs = await blobs_of(t, ref)
        for desc in descs:
            assert digest_of((await read_blob(t, ref, desc))[1]) == desc.digest
        assert t.lean_connections == 0
    assert ("GET", f"http://{host}/v2/t/oci/blobs/{descs[-1].digest}") in tinyproxy.requests()


# --- a http_loopback server of the tests' own, for what no real registry answers ---------------------

LAYER = random.Random(7).randbytes(300_000)
LAYER_DIGEST = digest_of(LAYER)
LAYER_DESC = Descriptor(DOCKER_LAYER_GZIP, LAYER_DIGEST, len(LAYER))
OK_HEAD = b"HTTP/1.1 200 OK\r\nDocker-Distribution-API-Version: registry/2.0\r\n"


# (request number on its connection, request header block, the connection's writer) -> keep the connection open
def ok(body: bytes, extra: bytes = b"") -> bytes:
    return OK_HEAD + b"Content-Length: %d\r\n%s\r\n" % (len(body), extra) + body


def ranged(request: bytes, data: bytes) -> bytes:
    """Answer `request` for `data`: 206 from the byte its Range names, else 200 with all of it."""
    for line in request.split(b"\r\n"):
        if line.lower().startswith(b"range: bytes="):
            start = int(line.split(b"=")[1].rstrip(b"-"))
            rng = b"Content-Range: bytes %d-%d/%d\r\n" % (start, len(data) - 1, len(data))
            part = data[start:]
            return b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n%s\r\n" % (len(part), rng) + part
    return ok(data)


def transport(**kw: object) -> Transport:
    return Transport(credentials=NO_DOCKER, **{"retry": ONCE, **kw})  # type: ignore[arg-type]


async def fetch(t: Transport, lb: Loopback, desc: Descriptor = LAYER_DESC) -> bytes:
    return (await read_blob(t, lb.ref(), desc))[1]


async def test_a_body_cut_short_is_resumed_with_range_through_the_engine(
    http_loopback: Callable[[Handler], Awaitable[Loopback]], tmp_path: Path
) -> None:
    config_blob = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_SCHEMA2,
            "config": {"mediaType": DOCKER_CONFIG, "digest": str(digest_of(config_blob)), "size": len(config_blob)},
            "layers": [{"mediaType": DOCKER_LAYER_GZIP, "digest": str(LAYER_DIGEST), "size": len(LAYER)}],
        }
    ).encode()
    cut = [True]

    async def handle(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        if b"/manifests/" in req:
            w.write(ok(manifest, f"Content-Type: {DOCKER_SCHEMA2}\r\n".encode()))
        elif str(LAYER_DIGEST).encode() in req:
            if cut:
                cut.clear()
                w.write(ok(LAYER)[: -len(LAYER) + 100_000])  # the headers and 100,000 bytes of the body
                return False
            w.write(ranged(req, LAYER))
        else:
            w.write(ok(config_blob))
        return True

    lb = await http_loopback(handle)
    async with transport(retry=FAST) as t:
        engine = Engine(Layout.open(tmp_path / "c"), limits=t.limits, retry=FAST)
        [result] = await engine.pull_many([(RegistryV2Source(t), Reference.parse(lb.ref()))])
        assert result.status == "ok", result.error
        assert t.lean_connections >= 1
    assert (tmp_path / "c" / "blobs" / "sha256" / LAYER_DIGEST.hex).read_bytes() == LAYER
    layer_gets = [r for r in lb.requests if str(LAYER_DIGEST).encode() in r]
    assert len(layer_gets) == 2 and b"Range: bytes=100000-" in layer_gets[1]  # only the missing bytes again


async def test_a_body_cut_short_is_one_stream_error(http_loopback: Callable[[Handler], Awaitable[Loopback]]) -> None:
    async def handle(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(LAYER)[:-1000])
        return False

    lb = await http_loopback(handle)
    async with transport() as t:
        with pytest.raises(StreamError, match=r"GET .*/v2/r/blobs/sha256:\w+: body broke off: .*1000 bytes") as exc:
            await fetch(t, lb)
        assert "\n" not in str(exc.value)


async def test_bytes_past_the_length_are_dropped_with_the_connection(
    http_loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    async def handle(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(LAYER) + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # a second answer nobody asked for
        return True

    lb = await http_loopback(handle)
    async with transport() as t:
        for _ in range(3):
            assert await fetch(t, lb) == LAYER
        assert t.lean_connections == 3  # never reused: the extra bytes are never read as the next answer
    assert len(lb.requests) == 3


def stalling(never: asyncio.Event) -> Handler:
    """Return a handler that sends all but the last 1,000 bytes of LAYER, then waits for `never`."""

    async def handle(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(LAYER)[:-1000])
        await w.drain()
        await never.wait()
        return False

    return handle


async def test_a_stalled_body_ends_at_its_deadline(http_loopback: Callable[[Handler], Awaitable[Loopback]]) -> None:
    never = asyncio.Event()
    lb = await http_loopback(stalling(never))
    try:
        async with transport(timeouts=Timeouts(blob_base=1.0, min_rate=1e12)) as t:
            with pytest.raises(StreamError, match=r"did not arrive whole within 1 s \(deadline\)$"):
                await fetch(t, lb)
    finally:
        never.set()
    assert len(lb.requests) == 1


async def test_a_body_with_no_byte_for_the_read_timeout_breaks_off(
    http_loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    never = asyncio.Event()
    lb = await http_loopback(stalling(never))
    try:
        async with transport(timeouts=Timeouts(read=0.5)) as t:  # the blob's deadline: 30 s and more
            with pytest.raises(StreamError, match=r"body broke off: no byte for 0.5 s \(read timeout\)$"):
                await fetch(t, lb)
    finally:
        never.set()


async def test_an_abandoned_body_closes_its_connection(http_loopback: Callable[[Handler], Awaitable[Loopback]]) -> None:
    async def handle(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(LAYER))
        return True

    lb = await http_loopback(handle)
    async with transport() as t:
        async with RegistryV2Source(t).open_blob(Reference.parse(lb.ref()), LAYER_DESC) as body:
            await anext(body.chunks)  # then stop reading
        assert await fetch(t, lb) == LAYER
        assert await fetch(t, lb) == LAYER
        assert t.lean_connections == 2  # the abandoned one was closed; the next is reused


async def test_reading_pauses_while_the_reader_lags(http_loopback: Callable[[Handler], Awaitable[Loopback]]) -> None:
    size = 64 << 20
    piece = bytes(1 << 20)
    sent = [0]

    async def handle(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(OK_HEAD + b"Content-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(piece)):
            w.write(piece)
            await w.drain()
            sent[0] += len(piece)
        return True

    lb = await http_loopback(handle)
    desc = Descriptor(DOCKER_LAYER_GZIP, digest_of(bytes(size)), size)
    async with transport() as t:
        async with RegistryV2Source(t).open_blob(Reference.parse(lb.ref()), desc) as body:
            got = len(await anext(body.chunks))
            # The server writes until the socket's buffers and the client's bounded queue are
            # full: wait until it has made no progress for a while, then count.
            last, still = -1, 0
            for _ in range(600):
                still = still + 1 if sent[0] == last else 0
                if still >= 10:
                    break
                last = sent[0]
                await asyncio.sleep(0.05)
            assert sent[0] < size // 2  # not read into memory whole
            assert sent[0] >= MAX_BODY_BUFFER
            h = hashlib.sha256()
            async for chunk in body.chunks:
                got += len(chunk)
                h.update(chunk)
        assert got == size
        assert await fetch(t, lb, desc) == bytes(size)  # a body read whole: its connection is reused
        assert t.lean_connections == 1


async def test_chunked_and_length_less_bodies_are_read_on_the_lean_path(
    http_loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    async def chunked(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(LAYER), 70_000):
            part = LAYER[i : i + 70_000]
            w.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
        w.write(b"0\r\nX-Trailer: 1\r\n\r\n")
        return True

    async def until_close(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(OK_HEAD + b"\r\n" + LAYER)
        return False

    for handle, connections in ((chunked, 1), (until_close, 3)):
        lb = await http_loopback(handle)
        async with transport() as t:
            for _ in range(3):
                assert await fetch(t, lb) == LAYER
            assert t.lean_connections == connections
        assert len(lb.requests) == 3  # none sent again through aiohttp


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # not a hex size
        b"3\r\nabcX\r\n0\r\n\r\n",  # no CRLF after the data
        b"3\nabc\r\n0\r\n\r\n",  # a bare LF
        b"f" * 5000,  # a size line past the bound
        b"3\r\nabc\r\n",  # then the connection closes: the last chunk never came
    ],
)
async def test_a_malformed_chunked_body_is_one_stream_error(
    http_loopback: Callable[[Handler], Awaitable[Loopback]], body: bytes
) -> None:
    async def handle(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body)
        return False

    lb = await http_loopback(handle)
    async with transport() as t:
        with pytest.raises(StreamError, match="body broke off") as exc:
            await fetch(t, lb, Descriptor(DOCKER_LAYER_GZIP, digest_of(b"abc"), 3))
        assert "\n" not in str(exc.value)
    assert len(lb.requests) == 1


async def test_headers_past_the_bound_go_through_aiohttp(
    http_loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(MAX_HEADER_BYTES // 1000 + 2))

    async def handle(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(LAYER, filler))
        return True

    lb = await http_loopback(handle)
    async with transport() as t:
        assert await fetch(t, lb) == LAYER  # aiohttp reads them: no limit on their total
    assert len(lb.requests) == 2  # the lean path gave up, aiohttp asked again


async def test_a_redirect_sends_this_hosts_gets_through_aiohttp(
    http_loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    async def handle(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        if req.startswith(b"GET /storage/"):
            w.write(ok(LAYER))
        else:
            where = b"/storage/" + str(LAYER_DIGEST).encode()
            w.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: %s\r\nContent-Length: 5\r\n\r\nmoved" % where)
        return True

    lb = await http_loopback(handle)
    async with transport() as t:
        for _ in range(3):
            assert await fetch(t, lb) == LAYER
        assert t.lean_connections == 1
    # The lean path's try and aiohttp following its redirect; then aiohttp's requests alone.
    assert len(lb.lines(b"/v2/r/blobs/")) == 1 + 2
    assert len(lb.lines(b"GET /storage/")) == 3


async def test_a_challenge_is_answered_through_aiohttp_then_credentials_go_lean(
    http_loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    async def handle(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        if b"Authorization: Basic " not in req:
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
            challenge = b'WWW-Authenticate: Basic realm="r"\r\n'
            w.write(b"HTTP/1.1 401 Unauthorized\r\n%sContent-Length: %d\r\n\r\n%s" % (challenge, len(body), body))
        else:
            w.write(ok(LAYER))
        return True

    lb = await http_loopback(handle)
    creds = CredentialStore({lb.host: Credential("u", "p4ss")}, use_docker_config=False)
    async with Transport(credentials=creds, retry=ONCE) as t:
        for _ in range(3):
            assert await fetch(t, lb) == LAYER
        assert t.lean_connections == 1
        assert t.requests == 5  # lean 401, aiohttp's 401 and its answer with credentials, then two lean GETs
    assert [b"Authorization: Basic " in r for r in lb.requests] == [False, False, True, True, True]


async def test_an_overloaded_answer_is_the_first_attempt_not_sent_again_at_once(
    http_loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    busy = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: %d\r\n\r\n%s"
    body = b'{"errors":[{"code":"UNAVAILABLE","message":"busy now"}]}'
    first = [True]

    async def handle(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(busy % (len(body), body) if first else ok(LAYER))
        first.clear()
        return True

    lb = await http_loopback(handle)
    async with transport(retry=RetryPolicy(attempts=2, base=0.01, cap=0.01)) as t:
        assert await fetch(t, lb) == LAYER
        assert t.retries == 1
    assert len(lb.requests) == 2  # the 503, then one retry: as aiohttp's path alone would

    async def always_busy(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(busy % (len(body), body))
        return True

    lb = await http_loopback(always_busy)
    async with transport() as t:  # one attempt only: the 503 is the answer, its message the registry's
        with pytest.raises(MirrorError, match=r"GET .*/v2/r/blobs/sha256:\w+: HTTP 503 UNAVAILABLE: busy now$"):
            await fetch(t, lb)
    assert len(lb.requests) == 1


async def test_a_connection_closed_between_requests_is_not_an_error(
    http_loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    async def one_per_connection(n: int, req: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(LAYER))
        return False  # a keep-alive connection the server drops after one answer

    lb = await http_loopback(one_per_connection)
    async with transport() as t:
        for _ in range(4):
            assert await fetch(t, lb) == LAYER
        assert t.lean_connections >= 2


class Recorded:
    """TransportEvents that keep every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def response(self, host: str, method: str, status: str) -> None:
        self.calls.append(("response", method, status))

    def retry(self, host: str) -> None:
        self.calls.append(("retry",))

    def rate_limit_wait(self, host: str, seconds: float) -> None:
        self.calls.append(("rate_limit_wait",))


async def test_events_log_lines_and_counts_are_those_of_aiohttps_path(
    http_loopback: Callable[[Handler], Awaitable[Loopback]], caplog: pytest.LogCaptureFixture
) -> None:
    busy = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n"
    seen = []
    for lean in (True, False):
        first = [True]

        async def handle(n: int, req: bytes, w: asyncio.StreamWriter, first: list[bool] = first) -> bool:
            w.write(busy if first else ok(LAYER))
            first.clear()
            return True

        lb = await http_loopback(handle)
        events = Recorded()
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="mirror.transport"):
            async with transport(retry=RetryPolicy(attempts=2, base=0.01, cap=0.01), lean_get=lean) as t:
                t.events = events
                assert await fetch(t, lb) == LAYER
                counts = (t.requests, t.retries, t.lean_connections > 0)
        lines = [re.sub(r"\d+\.\d+ ?s", "S", r.getMessage()).replace(lb.host, "HOST") for r in caplog.records]
        seen.append((events.calls, lines, counts[:2]))
        assert counts[2] == lean
    assert seen[0] == seen[1]
    calls, lines, _ = seen[0]
    assert calls == [("response", "GET", "503"), ("retry",), ("response", "GET", "200")]
    assert lines[0] == f"GET http://HOST/v2/r/blobs/{LAYER_DIGEST} 503 0 bytes S"
    assert lines[-1] == f"GET http://HOST/v2/r/blobs/{LAYER_DIGEST} 200 {len(LAYER)} bytes S"
