"""The config file's schema: unknown keys, line numbers, no echoed values, paths, permissions, docs/config.md."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mirror import config
from mirror.store.layout import Layout
from mirror.tomlscan import key_lines

ROOT = Path(__file__).resolve().parent.parent
JOB = '[[jobs]]\nname = "j"\nsource = { type = "registry", host = "h.example" }\nrepositories = ["a"]\n'
SECRET = "S3CRET-73519826"


def mirror(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m mirror ARGS` in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


# --- unknown keys (#17.6) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            '[[registries]]\nhost = "r.example"\npasword_env = "PW"\n',
            3,
            "registries[0]: unknown key 'pasword_env' (did you mean 'password_env'?)",
        ),
        (
            '[[registries]]\nhost = "r.example"\ninsecur = true\n',
            3,
            "registries[0]: unknown key 'insecur' (did you mean 'insecure'?)",
        ),
        (
            "[engine]\nper_host = 2\nconcurency = 4\n",
            3,
            "engine: unknown key 'concurency' (did you mean 'concurrency'?)",
        ),
        ('[cahce]\npath = "./c"\n', 1, "unknown key 'cahce' (did you mean 'cache'?)"),
        ("[retry]\natempts = 3\n", 2, "retry: unknown key 'atempts' (did you mean 'attempts'?)"),
        ("[tls]\ncert_dirs = []\n", 2, "tls: unknown key 'cert_dirs' (did you mean 'certs_dirs'?)"),
        ('[auth]\ndocker_conifg = "d.json"\n', 2, "auth: unknown key 'docker_conifg' (did you mean 'docker_config'?)"),
        ('[docker]\nulr = "unix:///x.sock"\n', 2, "docker: unknown key 'ulr' (did you mean 'url'?)"),
        (
            JOB + 'tags = { list = ["1"], newst = 2 }\n',
            5,
            "jobs[0].tags: unknown key 'newst' (did you mean 'newest'?)",
        ),
        (
            '[[registries]]\nhost = "r.example"\n' + JOB + "prue = true\n",
            7,
            "jobs[0]: unknown key 'prue' (did you mean 'prune'?)",
        ),
    ],
)
def test_a_typo_is_exit_2_naming_file_line_key_and_the_closest_key(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text if "[[jobs]]" in text else text + JOB)
    res = mirror("sync", "-c", str(path), "--dry-run", "--cache", str(tmp_path / "cache"))
    assert res.returncode == 2, res.stderr
    assert res.stderr == f"mirror: {path}:{line}: {message}\n"
    assert not (tmp_path / "cache").exists()


def test_every_table_rejects_unknown_keys() -> None:
    """Each table of the schema, nested ones too, refuses a key it does not know."""
    for table in config.TABLES:
        doc = place(table.name, "zzz_unknown", 1)
        with pytest.raises(config.ConfigError, match=r"unknown key 'zzz_unknown' \(known: "):
            config.parse(doc, "c.toml")


def test_an_unknown_key_of_the_other_source_type_is_refused() -> None:
    doc = place("jobs.source", "url", "unix:///x.sock")
    message = r"jobs\[0\]\.source: unknown key 'url' \(url is for type = \"daemon\"; known: type, host\)$"
    with pytest.raises(config.ConfigError, match=message):
        config.parse(doc, "c.toml")


# --- no value in a message (#16.12) ---------------------------------------------------------


def place(table: str, key: str, value: Any) -> dict[str, Any]:
    """Return a valid document with `key = value` written in `table` (a schema table name)."""
    job: dict[str, Any] = {"name": "j", "source": {"type": "registry", "host": "h.example"}, "repositories": ["a"]}
    if table in ("registries", "upstreams"):
        return {table: [{"host": "r.example", key: value}]}
    if table == "jobs":
        return {"jobs": [{**job, key: value}]}
    if table.startswith("jobs."):
        sub = table.removeprefix("jobs.")
        base = {"source": job["source"], "destination": {"type": "registry", "host": "t.example"}}.get(sub, {})
        return {"jobs": [{**job, sub: {**base, key: value}}]}
    return {table: {key: value}}


def wrong_type(kind: config.Kind) -> Any:
    """Return a value of another type than `kind` takes, holding SECRET."""
    if not kind.accepts(SECRET):
        return SECRET
    if not kind.accepts(73519826):
        return 73519826
    return [SECRET]


@pytest.mark.parametrize("table", config.TABLES, ids=lambda t: t.name)
def test_no_message_echoes_a_value_of_any_key(table: config.Table, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRROR_TEST_PW", "pw")
    for key in table.keys:
        # A value of the wrong type, and a string of the wrong shape: neither shows in the message.
        shaped = f"{SECRET} :/@'x(["
        bad = [wrong_type(key.kind)] + [v for v in (shaped, [shaped], [SECRET, 1]) if key.kind.accepts(v)]
        for value in bad:
            try:
                config.parse(place(table.name, key.name, value), "c.toml")
            except config.ConfigError as exc:
                text = str(exc)
                assert "S3CRET" not in text and "73519826" not in text, text
                assert text.startswith("c.toml: ") and "\n" not in text, text
                assert key.name in text or table.name.split(".")[-1] in text, text
            else:
                assert key.kind.accepts(value), f"{table.name}.{key.name} took a value of the wrong type"


@pytest.mark.parametrize(
    ("reg", "message"),
    [
        ({"password": 73519826}, "registries[0].password: expected a string, got an integer"),
        ({"proxy": "mirror:pa55-73519826@proxy.corp:3128"}, 'registries[0].proxy: expected "none" or http://'),
        ({"proxy": "http://mirror:pa55/73519826@proxy.corp:3128"}, "registries[0].proxy: not a proxy URL"),
        ({"proxy": "http://mirror:pa55-73519826@proxy.corp:x"}, "registries[0].proxy: not a proxy URL"),
        ({"username": ["73519826"]}, "registries[0].username: expected a string, got an array"),
    ],
)
def test_secrets_in_bad_values_are_not_shown(tmp_path: Path, reg: dict[str, Any], message: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse({"registries": [{"host": "r.example", **reg}]}, "c.toml")
    assert message in str(err.value)
    assert "73519826" not in str(err.value)


def test_a_bad_password_value_is_exit_2_without_the_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[registries]]\nhost = "r.example"\nusername = "u"\npassword = 73519826\n' + JOB)
    path.chmod(0o600)
    res = mirror("sync", "-c", str(path), "--dry-run")
    assert res.returncode == 2
    assert res.stderr == f"mirror: {path}:4: registries[0].password: expected a string, got an integer\n"
    assert "73519826" not in res.stdout + res.stderr


def test_env_proxy_credentials_are_masked_even_with_a_slash_in_the_password() -> None:
    from mirror.proxy import ProxyError, parse_proxy

    with pytest.raises(ProxyError) as err:
        parse_proxy("http://mirror:pa/55-73519826@proxy.corp:3128")
    assert str(err.value) == "http://***@proxy.corp:3128: not a proxy URL (bad port)"


# --- relative paths (#17.7) -----------------------------------------------------------------


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "ca.pem").write_text("x")
    path = conf / "mirror.toml"
    path.write_text(
        '[cache]\npath = "./cache"\n[auth]\ndocker_config = "docker/config.json"\n'
        '[tls]\ncerts_dirs = ["certs.d", "/etc/docker/certs.d"]\n'
        '[[registries]]\nhost = "r.example"\nca_file = "ca.pem"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config.load(Path("../etc/mirror.toml"))
    assert cfg.cache.resolve() == conf / "cache"
    assert cfg.docker_config is not None and cfg.docker_config.resolve() == conf / "docker" / "config.json"
    assert [d.resolve() for d in cfg.certs_dirs] == [conf / "certs.d", Path("/etc/docker/certs.d")]
    ca = cfg.registries[0].ca_file
    assert ca is not None and ca.resolve() == conf / "ca.pem"
    # `~` is the home directory, as before.
    monkeypatch.setenv("HOME", str(tmp_path))
    path.write_text('[cache]\npath = "~/c"\n')
    assert config.load(path).cache == tmp_path / "c"


def test_cli_finds_the_cache_next_to_the_config_from_another_directory(tmp_path: Path) -> None:
    conf, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    conf.mkdir()
    elsewhere.mkdir()
    Layout.open(conf / "cache")
    path = conf / "mirror.toml"
    path.write_text('[cache]\npath = "cache"\n')
    res = mirror("ls", "-c", str(path), "--json", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    assert not (elsewhere / "cache").exists()
    # `--cache` on the command line stays relative to the current directory (there is no etc/other).
    Layout.open(elsewhere / "other")
    res = mirror("ls", "-c", str(path), "--cache", "./other", "--json", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert not (conf / "other").exists()


# --- permissions (#16.14) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registry", "mode", "warned"),
    [
        ('password = "pw"', 0o644, True),
        ('password = "pw"', 0o640, True),
        ('password = "pw"', 0o600, False),
        ('identity_token = "tok"', 0o604, True),
        ('proxy = "http://u:pw@proxy.corp:3128"', 0o644, True),
        ('proxy = "http://u@proxy.corp:3128"', 0o644, False),
        ('password_env = "HOME"', 0o644, False),
    ],
)
def test_a_readable_config_holding_a_password_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, registry: str, mode: int, warned: bool
) -> None:
    path = tmp_path / "mirror.toml"
    path.write_text(f'[[registries]]\nhost = "r.example"\nusername = "u"\n{registry}\n')
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="mirror.config"):
        config.load(path)
    lines = [r.getMessage() for r in caplog.records if r.name == "mirror.config"]
    if warned:
        assert lines == [
            f"mirror: warning: config {path} holds a password and is readable by others (mode 0{mode:o}); chmod 600 it"
        ]
    else:
        assert lines == []


def test_the_permission_warning_is_one_line_on_stderr(tmp_path: Path) -> None:
    Layout.open(tmp_path / "cache")
    path = tmp_path / "mirror.toml"
    path.write_text(
        f'[cache]\npath = "cache"\n[[registries]]\nhost = "r.example"\nusername = "u"\npassword = "{SECRET}"\n'
    )
    path.chmod(0o644)
    res = mirror("ls", "-c", str(path))
    assert res.returncode == 0, res.stderr
    assert res.stderr == (
        f"mirror: warning: config {path} holds a password and is readable by others (mode 0644); chmod 600 it\n"
    )
    assert SECRET not in res.stderr


# --- the schema and its docs ----------------------------------------------------------------


def test_docs_config_md_is_the_generated_reference() -> None:
    assert (ROOT / "docs" / "config.md").read_text() == config.reference(), (
        "run: python -m mirror.config > docs/config.md"
    )


def test_the_generator_runs_as_a_module() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "mirror.config"], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    assert res.stdout == config.reference()


def test_defaults_of_the_schema_are_the_defaults_of_config() -> None:
    assert config.parse({}, "c.toml") == config.Config()
    registry = config.parse({"registries": [{"host": "r.example"}]}, "c.toml").registries[0]
    assert registry == config.RegistryConfig("r.example")


def test_the_example_writes_every_key_of_the_schema() -> None:
    text = (ROOT / "config.example.toml").read_text()
    for table in config.TABLES:
        for key in table.keys:
            assert re.search(rf"\b{key.name}\s*=", text), f"config.example.toml does not show {table.name}.{key.name}"


def test_key_lines_follow_tables_arrays_and_inline_tables() -> None:
    text = (
        'top = 1\n[a]\nb.c = "x" # c\n"d" = """\nq = 2\n"""\nlist = [\n  1,\n  2,\n]\n'
        "[[j]]\nk = { x = 1, y = { z = 2 } }\n[[j]]\nk = 3\n[j.s]\nt = 1979-05-27 07:32:00\nu = 'v'\n"
    )
    tomllib.loads(text)  # valid TOML
    lines = key_lines(text)
    assert lines[("top",)] == 1 and lines[("a", "b", "c")] == 3 and lines[("a", "d")] == 4
    assert ("a", "q") not in lines and lines[("a", "list")] == 7 and lines[("a", "list", 1)] == 9
    assert lines[("j", 0, "k", "y", "z")] == 12 and lines[("j", 1, "k")] == 14
    assert lines[("j", 1, "s", "t")] == 16 and lines[("j", 1, "s", "u")] == 17
