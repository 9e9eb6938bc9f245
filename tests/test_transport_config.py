"""The registry parts of the TOML config: retry, timeouts, TLS files, secrets from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror import config
from mirror.auth import RetryPolicy
from mirror.config import ConfigError


def test_defaults_match_the_example_file() -> None:
    import tomllib

    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    parsed = config.parse(tomllib.loads(example.read_text()), "example")
    default = config.Config()
    for name in ("retry", "rate_limit_floor", "certs_dirs", "first_byte_timeout", "read_timeout", "connect_timeout"):
        assert getattr(parsed, name) == getattr(default, name), name
    assert parsed.use_docker_config and parsed.docker_config is None


def test_registry_settings_reach_the_transport(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not used here")
    monkeypatch.setenv("TOKEN_VAR", "tok-SECRET-1")
    doc = {
        "engine": {"per_host": 6, "first_byte_timeout": 7, "read_timeout": 3.5, "rate_limit_floor": 9},
        "retry": {"attempts": 2, "base": 0.1, "cap": 1, "max_wait": 30},
        "tls": {"certs_dirs": [str(tmp_path)]},
        "registries": [
            {"host": "r.example", "identity_token_env": "TOKEN_VAR", "ca_file": str(ca), "concurrency": 2},
            {"host": "s.example", "username": "u", "password": "pw-SECRET-2"},
        ],
    }
    cfg = config.parse(doc, "c.toml")
    assert cfg.retry == RetryPolicy(attempts=2, base=0.1, cap=1.0, max_wait=30.0)
    t = cfg.transport()
    assert t.timeouts.first_byte == 7 and t.timeouts.read == 3.5
    assert t.rate_limit_floor == 9 and t.retry == cfg.retry
    assert t.certs_dirs == (tmp_path,)
    assert t.config("r.example").ca_file == ca and t.config("r.example").identity_token == "tok-SECRET-1"
    assert t.limits.get("r.example").limit == 2 and t.limits.get("other.example").limit == 6
    assert t.base_url("r.example") == "https://r.example"
    for text in (repr(cfg), repr(t), repr(t.config("s.example")), repr(t.credentials)):
        assert "SECRET" not in text


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"retry": {"attempts": 0}}, "c.toml: retry.attempts: must be at least 1"),
        ({"retry": {"cap": "x"}}, "c.toml: retry.cap: expected a number, got a string"),
        ({"retry": []}, "c.toml: retry: expected a table, got an array"),
        ({"tls": {"certs_dirs": [1]}}, "c.toml: tls.certs_dirs[0]: expected a string, got an integer"),
        ({"registries": [{"host": "h", "ca_file": "/nonexistent/ca.pem"}]}, "registries[0].ca_file: no such file"),
        (
            {"registries": [{"host": "h", "identity_token_env": "NOPE_UNSET_VAR"}]},
            "_env: the environment variable it names is not set",
        ),
        ({"registries": [{"host": "h", "concurrency": 0}]}, "registries[0].concurrency: must be at least 1"),
    ],
)
def test_bad_values_name_file_and_key(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(doc, "c.toml")
    assert message in str(info.value)


def test_docker_hub_settings_apply_to_its_api_host() -> None:
    doc = {"registries": [{"host": "docker.io", "concurrency": 2, "username": "u", "password": "p"}]}
    t = config.parse(doc, "c.toml").transport()
    assert t.config("registry-1.docker.io").username == "u"
    assert t.limits.get("registry-1.docker.io").limit == 2
    assert t.config("quay.io").username is None
