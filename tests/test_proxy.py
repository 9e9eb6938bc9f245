"""Proxies: the environment as Docker and Go read it, per-registry overrides, and pulls through a real tinyproxy."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror import config
from mirror.config import ConfigError
from mirror.engine.copy import Engine, ImageResult
from mirror.proxy import Proxy, ProxyConfig, ProxyError, parse_no_proxy, parse_proxy
from mirror.reference import Reference
from mirror.sources.registry_v2 import RegistryV2Source
from mirror.store.layout import Layout
from mirror.transport import HostConfig, Transport
from tests.conftest import ROOT, Seeded
from tests.test_auth_bearer import PASSWORD, USER, TokenRegistry, bearer  # noqa: F401 - the Bearer registry fixture
from tests.test_transport_tls import TlsRegistry, tls_registry  # noqa: F401 - the TLS registry fixture
from tests.tinyproxy import TinyProxy
from tools.registry import free_port

P = "http://proxy.corp:3128"


def env_proxy(url: str, **env: str) -> str | None:
    proxy = ProxyConfig.from_env(env).proxy_for(url)
    return None if proxy is None else proxy.url


# --- The environment, as golang.org/x/net/http/httpproxy reads it -------------------------


def test_scheme_picks_the_variable() -> None:
    env = {"HTTP_PROXY": "http://h:1", "HTTPS_PROXY": "http://s:2"}
    assert env_proxy("http://reg.example/v2/", **env) == "http://h:1"
    assert env_proxy("https://reg.example/v2/", **env) == "http://s:2"
    assert env_proxy("https://reg.example/v2/", HTTP_PROXY="http://h:1") is None
    assert env_proxy("http://reg.example/v2/", HTTPS_PROXY="http://s:2") is None
    assert env_proxy("https://reg.example/v2/") is None


def test_upper_case_wins_and_empty_counts_as_unset() -> None:
    assert env_proxy("https://r.example/", HTTPS_PROXY="http://up:1", https_proxy="http://low:2") == "http://up:1"
    assert env_proxy("https://r.example/", https_proxy="http://low:2") == "http://low:2"
    assert env_proxy("https://r.example/", HTTPS_PROXY="", https_proxy="http://low:2") == "http://low:2"
    assert env_proxy("http://r.example/", http_proxy="http://low:3") == "http://low:3"


def test_value_without_scheme_is_http_and_port_defaults() -> None:
    assert env_proxy("https://r.example/", HTTPS_PROXY="proxy.corp:3128") == P
    assert env_proxy("https://r.example/", HTTPS_PROXY="http://proxy.corp") == "http://proxy.corp:80"
    assert parse_proxy("https://proxy.corp").port == 443


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "[::1]"])
def test_loopback_never_goes_through_the_environment(host: str) -> None:
    assert env_proxy(f"http://{host}:5000/v2/", HTTP_PROXY=P) is None
    assert env_proxy(f"https://{host}/v2/", HTTPS_PROXY=P) is None


def test_only_localhost_itself_is_exempt_not_its_subdomains() -> None:
    # Go checks `host == "localhost"`; a *.localhost name goes through the proxy unless NO_PROXY says so.
    assert env_proxy("http://reg.localhost:5000/", HTTP_PROXY=P) == P


@pytest.mark.parametrize(
    ("no_proxy", "url", "proxied"),
    [
        ("*", "https://anything.example/", False),
        ("example.com", "https://example.com/", False),
        ("example.com", "https://a.example.com/", False),
        ("example.com", "https://a.b.example.com:5000/", False),
        ("example.com", "https://notexample.com/", True),
        (".example.com", "https://a.example.com/", False),
        (".example.com", "https://example.com/", True),  # Go: a leading dot means subdomains only
        ("*.example.com", "https://a.example.com/", False),
        ("*.example.com", "https://example.com/", True),
        ("EXAMPLE.com", "https://A.Example.COM/", False),
        ("example.com:5000", "https://example.com:5000/", False),
        ("example.com:5000", "https://example.com/", True),
        ("example.com:443", "https://example.com/", False),  # the scheme's port when the URL has none
        ("example.com:443", "http://example.com/", True),
        ("10.1.2.3", "https://10.1.2.3:5000/", False),
        ("10.1.2.3", "https://10.1.2.4/", True),
        ("10.1.2.3:5000", "https://10.1.2.3:5000/", False),
        ("10.1.2.3:5000", "https://10.1.2.3:5001/", True),
        ("10.0.0.0/8", "https://10.200.3.4/", False),
        ("10.0.0.0/8", "https://11.0.0.1/", True),
        ("10.0.0.0/8", "https://ten.example/", True),
        ("2001:db8::/32", "https://[2001:db8::5]/", False),
        ("2001:db8::1", "https://[2001:db8::1]:5000/", False),
        ("[2001:db8::1]:5000", "https://[2001:db8::1]:5000/", False),
        ("[2001:db8::1]:5000", "https://[2001:db8::1]/", True),
        (" other.example , example.com ", "https://x.example.com/", False),
        (",,bad:port:x,:80,", "https://x.example.com/", True),  # malformed entries are skipped
        ("example.com,*", "https://any.where/", False),
    ],
)
def test_no_proxy(no_proxy: str, url: str, proxied: bool) -> None:
    assert (env_proxy(url, HTTPS_PROXY=P, HTTP_PROXY=P, NO_PROXY=no_proxy) == P) is proxied


def test_no_proxy_lower_case_and_upper_case_wins() -> None:
    assert env_proxy("https://a.example.com/", HTTPS_PROXY=P, no_proxy="example.com") is None
    assert env_proxy("https://a.example.com/", HTTPS_PROXY=P, NO_PROXY="other.com", no_proxy="example.com") == P


def test_no_proxy_parse_keeps_valid_entries() -> None:
    everything, rules = parse_no_proxy("a.example, 10.0.0.0/8, bad/cidr, [::1, 1.2.3.4:x")
    assert not everything
    assert len(rules) == 2


def test_credentials_are_decoded_and_never_shown() -> None:
    proxy = parse_proxy("http://us%40er:p%3Ass-SECRET@proxy.corp:3128")
    assert (proxy.username, proxy.password) == ("us@er", "p:ss-SECRET")
    assert proxy.url == P and str(proxy) == P
    assert "SECRET" not in repr(proxy) and "SECRET" not in repr(ProxyConfig.from_env({"HTTPS_PROXY": "u:p-SECRET@h"}))
    assert parse_proxy("http://[2001:db8::1]:3128").url == "http://[2001:db8::1]:3128"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("socks5://u:pw-SECRET@h:1080", "socks5://***@h:1080: SOCKS proxies are not supported"),
        ("ftp://h:21", "unsupported proxy scheme 'ftp'"),
        ("http://:3128", "no proxy host"),
        ("http://h:3128/path", "no path, query or fragment"),
        ("http://h:notaport", "not a proxy URL"),
        ("", "empty proxy URL"),
    ],
)
def test_bad_proxy_urls(text: str, message: str) -> None:
    with pytest.raises(ProxyError) as info:
        parse_proxy(text)
    assert message in str(info.value)
    assert "SECRET" not in str(info.value)


def test_unusable_variable_fails_requests_it_applies_to_only() -> None:
    cfg = ProxyConfig.from_env({"HTTPS_PROXY": "socks5://h:1080", "NO_PROXY": "internal.example"})
    with pytest.raises(ProxyError, match="HTTPS_PROXY: socks5://h:1080: SOCKS proxies are not supported"):
        cfg.proxy_for("https://registry.example/v2/")
    assert cfg.proxy_for("https://a.internal.example/v2/") is None
    assert cfg.proxy_for("https://127.0.0.1:5000/v2/") is None
    assert cfg.proxy_for("http://registry.example/v2/") is None


# --- Per-registry overrides: config and the Transport's decision per URL -------------------


def test_override_applies_to_the_registry_host_only() -> None:
    env = {"HTTPS_PROXY": "http://envproxy:8080", "NO_PROXY": "storage.internal"}
    t = Transport(
        {
            "reg.example": HostConfig(proxy=parse_proxy("http://regproxy:3128")),
            "127.0.0.1:5000": HostConfig(proxy=parse_proxy("http://127.0.0.1:3128")),
            "direct.example": HostConfig(direct=True),
        },
        env=env,
    )

    def via(url: str) -> str | None:
        proxy = t.proxy_for(url)
        return None if proxy is None else proxy.url

    assert via("https://reg.example/v2/a/manifests/1") == "http://regproxy:3128"
    # A redirect hop is decided by its own host: the environment for storage, NO_PROXY included.
    assert via("https://blobs.cdn.example/sha256/ab?sig=1") == "http://envproxy:8080"
    assert via("https://bucket.storage.internal/x") is None
    assert via("http://127.0.0.1:5000/v2/") == "http://127.0.0.1:3128"  # loopback too: the user asked for it
    assert via("http://127.0.0.1:5001/v2/") is None
    assert via("https://direct.example/v2/") is None  # "none" wins over the environment
    assert via("https://other.example/v2/") == "http://envproxy:8080"


def test_decisions_are_remembered_per_origin_and_stay_the_same() -> None:
    from urllib.parse import urlsplit

    # Every request asks for its proxy, base URL and origin: decided once per host (or
    # origin), they must give what a fresh decision gives, for every URL on that origin.
    env = {"HTTPS_PROXY": "http://envproxy:8080", "HTTP_PROXY": "http://plain:3128", "NO_PROXY": "storage.internal"}
    regproxy = parse_proxy("http://regproxy:3128")
    t = Transport({"reg.example": HostConfig(proxy=regproxy)}, env=env)
    fresh = ProxyConfig.from_env(env)
    urls = [
        "https://reg.example/v2/a/manifests/1",
        "https://reg.example/v2/b/blobs/sha256:ab",
        "https://reg.example:443/v2/",  # another spelling of the host: not the configured one, as before
        "http://reg.example/v2/",
        "https://blobs.cdn.example/sha256/ab?sig=1",
        "https://blobs.cdn.example?x=/y",
        "https://bucket.storage.internal/x",
        "http://127.0.0.1:5000/v2/",
        "http://bucket.storage.internal:8080#f",
    ]
    for _ in range(2):  # the second time from what the first remembered
        for url in urls:
            want = regproxy if urlsplit(url).netloc == "reg.example" else fresh.proxy_for(url)
            assert t.proxy_for(url) == want, url
    assert (
        t.base_url("reg.example") == "https://reg.example" and t.base_url("127.0.0.1:5000") == "http://127.0.0.1:5000"
    )
    assert t.base_url("127.0.0.1:5000") is t.base_url("127.0.0.1:5000")  # decided once, then looked up


def test_origin_prefix_holds_all_that_urlsplit_reads_an_origin_from() -> None:
    from urllib.parse import urlsplit

    from mirror.transport import origin_prefix, same_origin

    urls = [
        "https://Reg.Example:5000/v2/x?y=1#z",
        "http://h?q=http://evil.example/",
        "http://h#frag://x",
        "https://u:p@h:1/x",
        "http://[::1]:5000/v2/",
        "https://h:notaport/x",
        "/v2/relative?next=https://x/",
    ]
    for url in urls:
        prefix = origin_prefix(url)
        if prefix is None:
            assert "://" not in url.split("?")[0]
            continue
        a, b = urlsplit(url), urlsplit(prefix)
        assert (a.scheme, a.netloc) == (b.scheme, b.netloc), url
    assert same_origin("https://h:443/a", "https://H/b") and not same_origin("http://h/a", "https://h/a")
    assert not same_origin("https://h:1/a", "https://h:2/a")


def test_an_unusable_variable_fails_every_request_it_applies_to() -> None:
    t = Transport(env={"HTTPS_PROXY": "socks5://h:1080"})
    for _ in range(2):  # not remembered as "no proxy" after the first failure
        with pytest.raises(ProxyError, match="SOCKS"):
            t.proxy_for("https://registry.example/v2/")


def test_docker_hub_override_reaches_its_api_host() -> None:
    doc = {"registries": [{"host": "docker.io", "proxy": P}]}
    t = config.parse(doc, "c.toml").transport()
    assert t.proxy_for("https://registry-1.docker.io/v2/") == parse_proxy(P)


def test_proxy_setting_in_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_PW", "pw-SECRET")
    doc = {
        "registries": [
            {"host": "a.example", "proxy": "http://u:inline-SECRET@proxy.corp:3128"},
            {"host": "b.example", "proxy": "none"},
            {"host": "c.example", "proxy": "http://svc@proxy.corp:3128", "proxy_password_env": "PROXY_PW"},
            {"host": "d.example"},
        ]
    }
    cfg = config.parse(doc, "c.toml")
    t = cfg.transport()
    a, b, c, d = (t.config(h) for h in ("a.example", "b.example", "c.example", "d.example"))
    assert a.proxy == Proxy("http", "proxy.corp", 3128, "u", "inline-SECRET") and not a.direct
    assert b.proxy is None and b.direct
    assert c.proxy is not None and (c.proxy.username, c.proxy.password) == ("svc", "pw-SECRET")
    assert d.proxy is None and not d.direct
    for text in (repr(cfg), repr(t), repr(a), repr(c)):
        assert "SECRET" not in text


@pytest.mark.parametrize(
    ("reg", "message"),
    [
        ({"proxy": "socks5://h:1080"}, "registries[0].proxy: SOCKS proxies are not supported"),
        ({"proxy": "ftp://h"}, "registries[0].proxy: unsupported proxy scheme (expected http"),
        ({"proxy": "http://"}, "registries[0].proxy: no proxy host"),
        ({"proxy": "proxy.corp:3128"}, 'registries[0].proxy: expected "none" or http://[USER:PASS@]HOST:PORT'),
        ({"proxy": 3128}, "registries[0].proxy: expected a string, got an integer"),
        ({"proxy": "http://u:pw-SECRET@h:x"}, "registries[0].proxy: not a proxy URL"),
        (
            {"proxy": "http://h:1", "proxy_password_env": "NOPE_UNSET_VAR"},
            "_env: the environment variable it names is not set",
        ),
        ({"proxy_password_env": "HOME"}, "registries[0].proxy_password_env: set without a proxy URL"),
        ({"proxy": "http://h:1", "proxy_password_env": "HOME"}, "the proxy URL names no user"),
    ],
)
def test_bad_proxy_settings_name_the_key(reg: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"registries": [{"host": "h.example", **reg}]}, "c.toml")
    assert message in str(info.value)
    assert "SECRET" not in str(info.value) and "\n" not in str(info.value)


# --- Through a real tinyproxy ---------------------------------------------------------------

PROXY_USER, PROXY_PASSWORD = "mirror", "proxy-Pa55-SECRET"


@pytest.fixture(scope="module")
def tinyproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyProxy]:
    proxy = TinyProxy(tmp_path_factory.mktemp("tinyproxy")).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyProxy]:
    proxy = TinyProxy(tmp_path_factory.mktemp("tinyproxy-auth"), auth=(PROXY_USER, PROXY_PASSWORD)).start()
    yield proxy
    proxy.stop()


async def pull(transport: Transport, cache: Path, ref: str) -> ImageResult:
    async with transport:
        engine = Engine(Layout.open(cache), limits=transport.limits)
        [result] = await engine.pull_many([(RegistryV2Source(transport), Reference.parse(ref))])
    return result


def through(host: str, proxy: str, **extra: object) -> Transport:
    doc = {"registries": [{"host": host, "proxy": proxy, **extra}], "auth": {"use_docker_config": False}}
    doc["retry"] = {"attempts": 2, "base": 0.01, "cap": 0.01}
    return config.parse(doc, "t.toml").transport()


@pytest.mark.slow
async def test_pull_through_the_registry_proxy_setting(seeded: Seeded, tinyproxy: TinyProxy, tmp_path: Path) -> None:
    host = seeded.registry.host
    tinyproxy.clear()
    result = await pull(through(host, tinyproxy.url), tmp_path / "c", seeded.ref("t/schema2:1"))
    assert result.status == "ok", result.error
    assert str(result.digest) == seeded.digests["t/schema2:1"]
    seen = tinyproxy.requests()
    uris = {uri for _, uri in seen}
    assert f"http://{host}/v2/t/schema2/manifests/1" in uris
    blobs = [u for u in uris if u.startswith(f"http://{host}/v2/t/schema2/blobs/sha256:")]
    assert len(blobs) == 3  # config and two layers
    assert all(u.startswith(f"http://{host}/") for u in uris)


@pytest.mark.slow
async def test_environment_proxy_skips_loopback(
    seeded: Seeded, tinyproxy: TinyProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", tinyproxy.url)
    monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    tinyproxy.clear()
    doc = {"auth": {"use_docker_config": False}}
    transport = config.parse(doc, "t.toml").transport()
    assert transport.proxies.http is not None  # read from the environment
    result = await pull(transport, tmp_path / "c", seeded.ref("t/oci:1"))
    assert result.status == "ok", result.error
    assert str(result.digest) == seeded.digests["t/oci:1"]
    assert tinyproxy.requests() == []


@pytest.mark.slow
async def test_proxy_credentials(seeded: Seeded, auth_proxy: TinyProxy, tmp_path: Path) -> None:
    host = seeded.registry.host
    url = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{auth_proxy.port}"
    result = await pull(through(host, url), tmp_path / "c", seeded.ref("t/schema1:1"))
    assert result.status == "ok", result.error
    assert str(result.digest) == seeded.digests["t/schema1:1"]
    assert any(uri.startswith(f"http://{host}/v2/t/schema1/") for _, uri in auth_proxy.requests())


@pytest.mark.slow
async def test_wrong_proxy_credentials_are_one_line_without_the_password(
    seeded: Seeded, auth_proxy: TinyProxy, tmp_path: Path
) -> None:
    host = seeded.registry.host
    transport = through(host, f"http://{PROXY_USER}:wrong-SECRET@127.0.0.1:{auth_proxy.port}")
    result = await pull(transport, tmp_path / "c", seeded.ref("t/schema2:1"))
    assert result.status == "failed"
    assert transport.retries == 0
    # tinyproxy 1.11 answers wrong credentials with 401 (and WWW-Authenticate), missing ones with 407.
    assert result.error == f"proxy {auth_proxy.url} refused the credentials for {host} (401 Unauthorized)"
    no_creds = through(host, auth_proxy.url)
    result = await pull(no_creds, tmp_path / "c", seeded.ref("t/schema2:1"))
    assert result.error == (
        f"proxy {auth_proxy.url} asks for credentials (none in its URL) for {host} (407 Proxy Authentication Required)"
    )


@pytest.mark.slow
def test_cli_wrong_proxy_password_never_printed(seeded: Seeded, auth_proxy: TinyProxy, tmp_path: Path) -> None:
    cfg = tmp_path / "mirror.toml"
    cfg.write_text(
        "[auth]\nuse_docker_config = false\n[retry]\nattempts = 1\n"
        f'[[registries]]\nhost = "{seeded.registry.host}"\n'
        f'proxy = "http://{PROXY_USER}@127.0.0.1:{auth_proxy.port}"\nproxy_password_env = "MIRROR_PROXY_PW"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MIRROR_PROXY_PW": "wrong-SECRET"}
    res = subprocess.run(
        [sys.executable, "-m", "mirror", "pull", "-c", str(cfg), "--cache", str(tmp_path / "c"), seeded.ref("t/oci:1")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode != 0
    assert f"proxy {auth_proxy.url} refused the credentials for {seeded.registry.host} (401" in res.stdout
    assert "SECRET" not in res.stderr + res.stdout


@pytest.mark.slow
async def test_tls_registry_through_the_proxy_with_connect(
    tls_registry: TlsRegistry,  # noqa: F811 - the fixture imported above
    auth_proxy: TinyProxy,
    tmp_path: Path,
) -> None:
    pki, host = tls_registry.pki, tls_registry.registry.host
    url = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{auth_proxy.port}"
    extra = {"ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "client.cert"), "key_file": str(pki / "client.key")}
    auth_proxy.clear()
    transport = through(host, url, **extra)
    assert transport.base_url(host).startswith("https://")
    result = await pull(transport, tmp_path / "c", tls_registry.ref)
    assert result.status == "ok", result.error
    seen = auth_proxy.requests()
    assert seen and all(req == ("CONNECT", host) for req in seen)

    wrong = through(host, f"http://{PROXY_USER}:wrong-SECRET@127.0.0.1:{auth_proxy.port}", **extra)
    result = await pull(wrong, tmp_path / "c2", tls_registry.ref)
    assert result.error == f"proxy {auth_proxy.url} refused the credentials for {host} (401 Unauthorized)"
    assert wrong.retries == 0


@pytest.mark.slow
async def test_proxy_down_is_one_line_naming_the_proxy(seeded: Seeded, tmp_path: Path) -> None:
    host, port = seeded.registry.host, free_port()
    transport = through(host, f"http://user:pw-SECRET@127.0.0.1:{port}")
    result = await pull(transport, tmp_path / "c", seeded.ref("t/schema2:1"))
    assert result.status == "failed"
    assert transport.retries == 1  # retried as any connection error is
    assert result.error == f"cannot reach proxy http://127.0.0.1:{port} for {host}: Connection refused after 2 attempts"


@pytest.mark.slow
async def test_registry_down_behind_the_proxy(tinyproxy: TinyProxy, tmp_path: Path) -> None:
    host = f"127.0.0.1:{free_port()}"
    for extra, cache in (({}, "plain"), ({"ca_file": "/etc/ssl/certs/ca-certificates.crt"}, "connect")):
        transport = through(host, tinyproxy.url, **extra)
        result = await pull(transport, tmp_path / cache, f"{host}/a/b:1")
        # tinyproxy's own error page, plain or to CONNECT: named as the proxy's, retried like a connection error.
        expected = f"proxy {tinyproxy.url} could not connect to {host} (500 Unable to connect) after 2 attempts"
        assert result.error == expected, cache


@pytest.mark.slow
async def test_token_realm_goes_by_its_own_host(
    bearer: TokenRegistry,  # noqa: F811 - the fixture imported above
    tinyproxy: TinyProxy,
    tmp_path: Path,
) -> None:
    reg, issuer = bearer.registry.host, bearer.issuer.host
    doc = {
        "registries": [
            {"host": reg, "username": USER, "password": PASSWORD},
            {"host": issuer, "proxy": tinyproxy.url},  # the realm's host has a proxy, the registry none
        ],
        "auth": {"use_docker_config": False},
    }
    tinyproxy.clear()
    result = await pull(config.parse(doc, "t.toml").transport(), tmp_path / "c", bearer.ref("team/app:1"))
    assert result.status == "ok", result.error
    uris = [uri for _, uri in tinyproxy.requests()]
    assert uris and all(u.startswith(f"http://{issuer}/token?") for u in uris)
