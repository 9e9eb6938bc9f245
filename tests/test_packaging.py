"""Packaging: the distribution's name (not PyPI's unrelated `mirror`), its license, its `mirror` command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

DIST = "layer-mirror"


def test_pyproject_names_the_distribution_the_license_and_the_command() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DIST
    assert project["license"] == "Apache-2.0"
    assert project["scripts"] == {"mirror": "mirror.cli:entry"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


@pytest.mark.slow
def test_built_wheel_metadata(tmp_path: Path) -> None:
    """What `pip install` / `pipx install .` would install: the wheel's own metadata."""
    src = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "mirror", src / "mirror", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = zf.read(info).decode()
        entry_points = zf.read(info.replace("METADATA", "entry_points.txt")).decode()
    headers = dict(line.split(": ", 1) for line in meta.split("\n\n", 1)[0].splitlines() if ": " in line)
    assert headers["Name"] == DIST
    assert headers["License-Expression"] == "Apache-2.0"
    assert any(n.endswith("/licenses/LICENSE") for n in names)
    assert "mirror = mirror.cli:entry" in entry_points
    assert "mirror/cli.py" in names and not any(n.startswith(("tests/", "tools/", "bench/")) for n in names)
