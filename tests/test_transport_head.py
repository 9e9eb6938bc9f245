"""Manifest HEADs on the transport's lean path (`mirror.http1`): the same answers as aiohttp's, kept-alive
connections, and everything unusual sent again through aiohttp.

The real docker-registry answers the common cases (plain HTTP, Bearer tokens, TLS with a client
certificate, a proxy in between); a loopback server of the tests' own answers what no real
registry does (a body after an answer to HEAD, headers past the bound, no answer at all, a
connection closed between requests).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

import pytest

from mirror import config
from mirror.auth import RetryPolicy
from mirror.credentials import CredentialStore
from mirror.digest import Digest
from mirror.errors import MirrorError, NotFoundError
from mirror.http1 import MAX_HEADER_BYTES, MAX_IDLE, Unusual, parse_head
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.transport import Timeouts, Transport
from tests.conftest import Seeded
from tests.httploop import Handler, Loopback
from tests.test_auth_bearer import TokenRegistry, bearer, issuer  # noqa: F401 - the Bearer registry fixtures
from tests.test_proxy import TinyProxy, through, tinyproxy  # noqa: F401 - the tinyproxy fixture
from tests.test_transport_tls import TlsRegistry, tls_registry  # noqa: F401 - the TLS registry fixture
from tests.tokenissuer import TokenIssuer

NO_DOCKER = CredentialStore(use_docker_config=False)
ONCE = RetryPolicy(attempts=1)


async def head(transport: Transport, ref: str) -> Digest | None:
    return await RegistryV2Source(transport).head_manifest(Reference.parse(ref))


async def test_lean_heads_answer_as_aiohttp_does_over_one_connection(seeded: Seeded) -> None:
    names = sorted(seeded.digests)
    async with Transport(credentials=NO_DOCKER) as lean, Transport(credentials=NO_DOCKER, lean_head=False) as full:
        for _ in range(3):
            for name in names:
                got = await head(lean, seeded.ref(name))
                assert str(got) == seeded.digests[name]
                assert got == await head(full, seeded.ref(name))
        assert lean.lean_connections == 1  # one kept-alive connection carried every HEAD
        assert full.lean_connections == 0
        assert lean.requests == full.requests == 3 * len(names)


async def test_concurrent_heads_share_a_few_connections(seeded: Seeded) -> None:
    names = (sorted(seeded.digests) * 4)[:MAX_IDLE]
    async with Transport(credentials=NO_DOCKER) as t:
        got = await asyncio.gather(*(head(t, seeded.ref(n)) for n in names))
        assert [str(d) for d in got] == [seeded.digests[n] for n in names]
        assert 1 <= t.lean_connections <= len(names)
        opened = t.lean_connections
        await asyncio.gather(*(head(t, seeded.ref(n)) for n in names[:opened]))
        assert t.lean_connections == opened  # as many idle as were needed: all reused


async def test_a_missing_tag_is_the_same_error_either_way(seeded: Seeded) -> None:
    ref = seeded.ref("t/schema2:no-such-tag")
    errors = []
    for lean in (True, False):
        async with Transport(credentials=NO_DOCKER, lean_head=lean) as t:
            with pytest.raises(NotFoundError) as exc:
                await head(t, ref)
            errors.append(str(exc.value))
            assert t.lean_connections == (1 if lean else 0)
    assert errors[0] == errors[1]
    assert "not found" in errors[0] and "\n" not in errors[0]


async def test_bearer_tokens_go_on_the_lean_path_after_the_first_challenge(
    bearer: TokenRegistry,  # noqa: F811 - the fixture imported above
    issuer: TokenIssuer,  # noqa: F811
) -> None:
    host = bearer.registry.host
    doc = {"registries": [{"host": host, "username": "alice", "password": "alice-Pa55"}]}
    t = config.parse({**doc, "auth": {"use_docker_config": False}}, "t.toml").transport()
    async with Transport(credentials=NO_DOCKER, lean_head=False) as anon, t:
        want = await head(anon, bearer.ref("public/app:1"))  # anonymous pull is granted on public/
        assert want is not None
        for _ in range(4):
            assert await head(t, bearer.ref("team/app:1")) == want  # the same image, pushed twice
        assert t.lean_connections == 1
        assert len([r for r in issuer.requests if r.user == "alice"]) == 1  # one token, reused
        before = t.requests
        await head(t, bearer.ref("team/app:1"))
        assert t.requests == before + 1  # no 401 round any more


@pytest.mark.slow
async def test_lean_heads_over_tls_with_a_client_certificate(
    tls_registry: TlsRegistry,  # noqa: F811 - the fixture imported above
) -> None:
    doc = tls_registry.config()
    lean = config.parse(doc, "t.toml").transport()
    full = Transport(
        {tls_registry.registry.host: lean.config(tls_registry.registry.host)},
        credentials=NO_DOCKER,
        certs_dirs=[],
        lean_head=False,
    )
    async with lean, full:
        want = await head(full, tls_registry.ref)
        assert want is not None
        for _ in range(3):
            assert await head(lean, tls_registry.ref) == want
        assert lean.lean_connections == 1


@pytest.mark.slow
async def test_a_proxy_keeps_heads_on_aiohttps_path(
    seeded: Seeded,
    tinyproxy: TinyProxy,  # noqa: F811 - the fixture imported above
) -> None:
    host = seeded.registry.host
    tinyproxy.clear()
    async with through(host, tinyproxy.url) as t:
        assert str(await head(t, seeded.ref("t/oci:1"))) == seeded.digests["t/oci:1"]
        assert t.lean_connections == 0
    assert ("HEAD", f"http://{host}/v2/t/oci/manifests/1") in tinyproxy.requests()


# --- a loopback server of the tests' own, for what no real registry answers ---------------------

DIGEST = "sha256:" + hashlib.sha256(b"manifest").hexdigest()
OK = f"HTTP/1.1 200 OK\r\nDocker-Content-Digest: {DIGEST}\r\nContent-Length: 8\r\n\r\n".encode()

Answer = Callable[[int, bytes], Awaitable[bytes | None]]  # (request number on its connection, request) -> answer


@pytest.fixture
def loopback(
    http_loopback: Callable[[Handler], Awaitable[Loopback]],
) -> Callable[[Answer], Awaitable[Loopback]]:
    """Start a loopback server answering each request with what `answer` returns; None closes the connection."""

    async def start(answer: Answer) -> Loopback:
        async def handle(n: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
            out = await answer(n, request)
            if out is not None:
                writer.write(out)
            return out is not None

        return await http_loopback(handle)

    return start


def transport(**kw: object) -> Transport:
    return Transport(credentials=NO_DOCKER, retry=ONCE, **kw)  # type: ignore[arg-type]


async def test_a_body_after_the_answer_is_never_read_as_the_next_answer(
    loopback: Callable[[Answer], Awaitable[Loopback]],
) -> None:
    async def answer(n: int, req: bytes) -> bytes:
        return OK + b"manifest"  # a body to HEAD: the connection is out of step after it

    lb = await loopback(answer)
    async with transport() as t:
        for _ in range(3):
            assert str(await head(t, f"{lb.host}/r:1")) == DIGEST
    assert len(lb.requests) == 3 and lb.connections == 3  # never reused


async def test_connection_close_and_a_server_closing_between_requests(
    loopback: Callable[[Answer], Awaitable[Loopback]],
) -> None:
    async def close_header(n: int, req: bytes) -> bytes:
        return OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")

    async def one_per_connection(n: int, req: bytes) -> bytes | None:
        return OK if n == 0 else None  # a keep-alive connection the server drops: the next HEAD is retried

    for answer in (close_header, one_per_connection):
        lb = await loopback(answer)
        async with transport() as t:
            for _ in range(4):
                assert str(await head(t, f"{lb.host}/r:1")) == DIGEST


async def test_headers_past_the_bound_go_through_aiohttp(loopback: Callable[[Answer], Awaitable[Loopback]]) -> None:
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(MAX_HEADER_BYTES // 1000 + 2))

    async def answer(n: int, req: bytes) -> bytes:
        return OK.replace(b"\r\n\r\n", b"\r\n" + filler + b"\r\n")

    lb = await loopback(answer)
    async with transport() as t:
        assert str(await head(t, f"{lb.host}/r:1")) == DIGEST  # aiohttp reads them: no limit on their total
    assert len(lb.requests) == 2  # the lean path gave up, aiohttp asked again


async def test_redirect_and_error_statuses_go_through_aiohttp(
    loopback: Callable[[Answer], Awaitable[Loopback]],
) -> None:
    async def answer(n: int, req: bytes) -> bytes:
        if b" /v2/r/manifests/old " in req:
            return b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /v2/r/manifests/new\r\nContent-Length: 0\r\n\r\n"
        if b" /v2/r/manifests/new " in req:
            return OK
        return b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"

    lb = await loopback(answer)
    async with transport() as t:
        assert str(await head(t, f"{lb.host}/r:old")) == DIGEST
        with pytest.raises(MirrorError, match=r"HEAD .*/v2/r/manifests/bad: HTTP 400") as exc:
            await head(t, f"{lb.host}/r:bad")
        assert "\n" not in str(exc.value)


async def test_no_answer_is_bounded_by_the_first_byte_timeout(
    loopback: Callable[[Answer], Awaitable[Loopback]],
) -> None:
    never = asyncio.Event()

    async def answer(n: int, req: bytes) -> bytes:
        await never.wait()
        return OK

    lb = await loopback(answer)
    try:
        async with transport(timeouts=Timeouts(first_byte=0.3)) as t:
            with pytest.raises(MirrorError, match="timed out"):
                await head(t, f"{lb.host}/r:1")
        assert len(lb.requests) == 2  # the lean path's wait, then aiohttp's (the transport's retry policy)
    finally:
        never.set()


@pytest.mark.parametrize(
    "block",
    [
        b"HTTP/1.1 100 Continue",
        b"HTTP/2 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 200 OK\r\n folded: value",
        b"HTTP/1.1 200 OK\r\nno colon",
        b"HTTP/1.1 200 OK\r\nbad name: x",
        b"garbage",
        b"HTTP/1.1 200 OK\r\nX: a\rb",
        b"HTTP/1.1 200 OK\r\nX: a\nY: b",
        b"HTTP/1.1 \xb2\xb2\xb2 OK",
        b"HTTP/1.1 2000 OK",
    ],
)
def test_unusual_header_blocks_are_refused(block: bytes) -> None:
    with pytest.raises(Unusual):
        parse_head(block)


def test_header_block_is_read_as_written() -> None:
    answer, keep = parse_head(
        b"HTTP/1.1 200 OK\r\ndocker-content-digest:  sha256:abc \r\nRateLimit-Limit: 100;w=21600\r\nX: 1\r\nx: 2"
    )
    assert (answer.status, answer.reason, keep) == (200, "OK", True)
    assert answer.headers["Docker-Content-Digest"] == "sha256:abc"
    assert answer.headers.getall("X") == ["1", "2"]
    assert not parse_head(b"HTTP/1.1 404 Not Found\r\nConnection: Close")[1]
    assert not parse_head(b"HTTP/1.0 200 OK")[1]


async def test_a_server_closing_every_connection_at_once_is_one_clear_error() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    host = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with transport() as t:
            for _ in range(3):
                with pytest.raises(MirrorError) as exc:
                    await head(t, f"{host}/r:1")
                assert "\n" not in str(exc.value)
    finally:
        server.close()
        await server.wait_closed()


async def test_an_overloaded_answer_is_the_first_attempt_not_sent_again_at_once(
    loopback: Callable[[Answer], Awaitable[Loopback]],
) -> None:
    busy = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n"
    answers = [busy, OK]

    async def answer(n: int, req: bytes) -> bytes:
        return answers.pop(0) if answers else OK

    lb = await loopback(answer)
    retry = RetryPolicy(attempts=2, base=0.01, cap=0.01)
    async with Transport(credentials=NO_DOCKER, retry=retry) as t:
        assert str(await head(t, f"{lb.host}/r:1")) == DIGEST
        assert t.retries == 1
    assert len(lb.requests) == 2  # the 503, then one retry: as aiohttp's path alone would

    async def always_busy(n: int, req: bytes) -> bytes:
        return busy

    lb = await loopback(always_busy)
    async with transport() as t:  # one attempt only: the 503 is the answer
        with pytest.raises(MirrorError, match=r"HEAD .*/v2/r/manifests/1: HTTP 503 Service Unavailable$"):
            await head(t, f"{lb.host}/r:1")
    assert len(lb.requests) == 1
