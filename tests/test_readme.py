"""The README's examples run as written.

Convention: every fenced block of README.md says its language. ```sh blocks are run, in
order, by bash (-e, -o pipefail) in one fresh directory, with `mirror` on PATH, against a
docker-registry seeded as `make demo` seeds its own (tools/demo.py, smaller layers) standing
at 127.0.0.1:5000, and an empty one standing at registry.internal:5000 (the site's registry):
their real addresses are put in. ```console and ```text blocks (a remote registry, a Docker
daemon, systemd, a server that runs until stopped) are documentation only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, registry_digest
from tools.demo import seed
from tools.registry import Registry

FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.M | re.S)
KNOWN = {"sh", "console", "text", "toml", "json"}
DEMO_HOST, SITE_HOST = "127.0.0.1:5000", "registry.internal:5000"


def blocks(text: str) -> list[tuple[str, str]]:
    """Return (language, body) of every fenced block, in order."""
    return [(m[1], m[2]) for m in FENCE.finditer(text)]


def test_every_block_says_whether_it_runs() -> None:
    found = blocks((ROOT / "README.md").read_text())
    assert [lang for lang, _ in found if lang not in KNOWN] == []
    assert sum(lang == "sh" for lang, _ in found) >= 4
    # A fence the pattern missed (unbalanced, indented) would hide a block.
    assert (ROOT / "README.md").read_text().count("\n```") == 2 * len(found)


def test_docs_do_not_point_outside_the_repository() -> None:
    """The design notes outside the repository are not shipped: nothing may link to them."""
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "mirror").rglob("*.py")]
    assert [str(f) for f in files if "../shared" in f.read_text()] == []
    assert (ROOT / "docs" / "architecture.md").exists()
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Registry]]:
    root = tmp_path_factory.mktemp("readme")
    demo = Registry(root / "demo").start()
    site = Registry(root / "site").start()
    try:
        seed(demo.host, root / "src", unit=16 << 10)
        yield demo, site
    finally:
        site.stop()
        demo.stop()


@pytest.mark.slow
def test_readme_sh_blocks_run(registries: tuple[Registry, Registry], tmp_path: Path) -> None:
    demo, site = registries
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "mirror"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mirror "$@"\n')
    wrapper.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("MIRROR_CACHE", "DOCKER_HOST")},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "DOCKER_CONFIG": str(tmp_path / "docker"),  # no credentials of this machine's user
    }
    runnable = [body for lang, body in blocks((ROOT / "README.md").read_text()) if lang == "sh"]
    for body in runnable:
        script = body.replace(DEMO_HOST, demo.host).replace(SITE_HOST, site.host)
        res = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, f"{script}\n--- exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    # What the examples did is there: the site's registry got the images, the cache its references.
    names = subprocess.run(
        [sys.executable, "-m", "mirror", "ls", "--cache", str(work / "cache")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert f"{demo.host}/ubuntu:15.10\t" in names and f"{demo.host}/apps/web:2\t" not in names
    assert registry_digest(site.host, "mirror/ubuntu:15.10") == registry_digest(demo.host, "ubuntu:15.10")
