"""Start-up: what each command imports (not how long it takes: timings are for `make bench`, never asserted)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import pytest

from mirror import cli
from tests.conftest import ROOT
from tests.test_cli import _small_cache

# What a command that never opens a connection must not load: aiohttp (~0.25 s, two TLS
# contexts built at import), the engine, the transport and auth.
NETWORK = ("aiohttp", "yarl", "mirror.transport", "mirror.auth", "mirror.engine", "mirror.sources.registry_v2")


# Runs the command line in a fresh interpreter, then lists every module it imported (`-X importtime`
# misses the modules importlib.import_module loads, as the CLI loads its command's module).
_RUN = """
import json, sys
from mirror.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
with open(sys.argv[1], "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(code)
"""


def imported(tmp: Path, *args: str, bare: bool = False) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `mirror ARGS` in a new interpreter; return the process and every module it imported.

    `bare`: without `site` (`-S`, the installed packages on PYTHONPATH instead), so that nothing is
    imported before mirror is (this environment's .pth files import typing, pathlib, certifi...).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if bare:
        env["PYTHONPATH"] += os.pathsep + sysconfig.get_paths()["purelib"]
    out = tmp / "modules.json"
    res = subprocess.run(
        [sys.executable, *(["-S"] if bare else []), "-c", _RUN, str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    modules = set(json.loads(out.read_text()))
    assert "mirror.cli" in modules, res.stderr[-2000:]
    return res, modules


def loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    """Return the modules among `modules` that are one of `prefixes` or inside one of them."""
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_top_level_help_lists_each_commands_own_summary() -> None:
    """The static table `mirror --help` shows matches what each command module registers for itself."""
    commands = sorted(p.stem for p in (ROOT / "mirror" / "commands").glob("*.py") if "def register(" in p.read_text())
    assert sorted(cli.COMMANDS) == commands
    stub = cli.parser().format_help()
    for name in cli.COMMANDS:
        # With `only`, NAME's line comes from its module's own register(); the rest from the table.
        assert cli.parser(name).format_help() == stub, name


@pytest.mark.parametrize("args", [("--version",), ("--help",), ("-v", "--help")])
def test_version_and_help_import_no_command(tmp_path: Path, args: tuple[str, ...]) -> None:
    res, modules = imported(tmp_path, *args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "mirror" in res.stdout
    heavy = ("mirror.commands", "mirror.config", "asyncio", "uvloop", "logging", *NETWORK)
    assert loaded(modules, heavy) == []
    if args == ("--version",):
        assert res.stdout == "mirror 0.1.0\n"
        assert loaded(modules, ("argparse", "mirror.errors", "mirror.tls", "mirror.text")) == []  # nor anything else


@pytest.mark.parametrize("args", [("--version",), ("--help",)])
def test_version_and_help_import_no_typing(tmp_path: Path, args: tuple[str, ...]) -> None:
    """On an interpreter that has imported nothing yet, the answer does without typing (~0.015 s) too."""
    res, modules = imported(tmp_path, *args, bare=True)
    assert res.returncode == 0 and "mirror" in res.stdout, res.stderr[-2000:]
    assert loaded(modules, ("typing", "mirror.commands", "asyncio")) == []


def test_pull_help_loads_no_engine(tmp_path: Path) -> None:
    """`mirror pull --help` (and a usage error of pull) imports the command's options, not what a pull runs on."""
    from mirror.commands.pull import API_CHOICES
    from mirror.sources.detect import API_CHOICES as DETECTED

    assert API_CHOICES == DETECTED  # pull's --api choices, kept beside its options so that --help needs no transport
    res, modules = imported(tmp_path, "pull", "--help")
    assert res.returncode == 0 and "--api {auto,v2,v1}" in res.stdout, res.stderr[-2000:]
    assert loaded(modules, ("uvloop", "asyncio", "msgspec", *NETWORK)) == []


def test_a_usage_error_imports_no_other_command(tmp_path: Path) -> None:
    res, modules = imported(tmp_path, "ls", "--cache", str(tmp_path), "--nope")
    assert res.returncode == 2 and "unrecognized arguments: --nope" in res.stderr
    own = ["mirror.commands", "mirror.commands.common", "mirror.commands.daemon_source", "mirror.commands.ls"]
    assert loaded(modules, ("mirror.commands",)) == own
    assert loaded(modules, ("uvloop", "asyncio", *NETWORK)) == []


@pytest.mark.parametrize(
    "args",
    [
        ("ls",),
        ("ls", "--json"),
        ("gc", "--dry-run"),
        ("gc",),
        ("verify",),
        ("rm", "127.0.0.1:5000/app/n0:1"),
    ],
)
def test_cache_commands_never_load_the_network(tmp_path: Path, args: tuple[str, ...]) -> None:
    """`ls`, `gc`, `verify` and `rm` read only the cache: no aiohttp, engine, transport or auth is imported."""
    cache = _small_cache(tmp_path / "c", 2)
    res, modules = imported(tmp_path, *args, "--cache", str(cache))
    assert res.returncode == 0, res.stderr[-2000:]
    assert loaded(modules, NETWORK) == []
    own = {"mirror.commands", "mirror.commands.common", f"mirror.commands.{args[0]}"}
    own |= {"mirror.commands.daemon_source"} if args[0] == "ls" else set()  # `ls --daemon`'s options
    assert loaded(modules, ("mirror.commands",)) == sorted(own)


def test_a_config_file_without_jobs_loads_no_network(tmp_path: Path) -> None:
    """Reading a config with registries (credentials, a proxy, TLS files) builds no transport until a run needs one."""
    cache = _small_cache(tmp_path / "c", 1)
    cfg = tmp_path / "mirror.toml"
    cfg.write_text(
        f'[cache]\npath = "{cache}"\n[serve]\nmax_size = "20GiB"\ntag_ttl = "5m"\n'
        '[[registries]]\nhost = "reg.example"\nusername = "u"\npassword = "p"\n'
        'proxy = "http://proxy.example:3128"\n'
        '[gc]\ninterval = "1d"\n'
    )
    cfg.chmod(0o600)
    res, modules = imported(tmp_path, "ls", "-c", str(cfg))
    assert res.returncode == 0 and "127.0.0.1:5000/app/n0:1" in res.stdout, res.stderr[-2000:]
    assert loaded(modules, NETWORK) == [], res.stderr[-2000:]


def test_the_process_entry_is_entry() -> None:
    """`mirror` and `python -m mirror` both run `cli.entry` (the collector off while the process starts)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"mirror": "mirror.cli:entry"}
    assert "entry()" in (ROOT / "mirror" / "__main__.py").read_text()


def test_the_collector_comes_back_on_during_a_long_run() -> None:
    """With the collector off (`entry`), a command still running COLLECT_AFTER seconds in has it on again."""

    async def probe(args: argparse.Namespace) -> int:
        deadline = time.monotonic() + 60
        while not gc.isenabled():
            if time.monotonic() > deadline:
                return 1
            await asyncio.sleep(0.05)
        return 0

    gc.disable()
    try:
        assert asyncio.run(cli.run_command(argparse.Namespace(run=probe))) == 0
        assert gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize(("args", "code", "out"), [(("--version",), 0, "mirror 0.1.0"), (("ls", "--nope"), 2, "")])
def test_entry_exits_with_mains_code(args: tuple[str, ...], code: int, out: str) -> None:
    """`python -m mirror` (entry) exits with what argparse or the command decided, its output flushed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == code, res.stderr[-2000:]
    assert res.stdout.strip() == out
