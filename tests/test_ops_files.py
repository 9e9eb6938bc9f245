"""Ops files: the systemd unit verifies, its user can be created, the CronJob runs the image built here."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

OPS = ROOT / "docs" / "ops"


def _unit() -> dict[str, str]:
    """Return the [Service] settings of mirror.service (the last value of each key)."""
    text = (OPS / "mirror.service").read_text()
    service = text.split("[Service]", 1)[1].split("[Install]", 1)[0]
    return dict(
        line.split("=", 1) for line in service.splitlines() if "=" in line and not line.lstrip().startswith("#")
    )


def test_unit_runs_as_the_sysusers_user_in_its_state_directory() -> None:
    unit = _unit()
    lines = (OPS / "mirror.sysusers.conf").read_text().splitlines()
    (entry,) = [shlex.split(line) for line in lines if line.startswith("u ")]
    user, home = entry[1], entry[4]
    assert unit["User"] == unit["Group"] == user == "mirror"
    assert unit["StateDirectory"] == "mirror" and unit["WorkingDirectory"] == home == "/var/lib/mirror"
    assert unit["LimitNOFILE"] == "65536"
    assert unit["ExecStart"].startswith("/usr/local/bin/mirror daemon ")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` also checks that ExecStart's command exists: point it at the installed one."""
    installed = shutil.which("mirror")
    if installed is None:
        pytest.skip("no `mirror` command on PATH (the package is not installed)")
    unit = tmp_path / "mirror.service"
    unit.write_text((OPS / "mirror.service").read_text().replace("/usr/local/bin/mirror", installed))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert [line for line in res.stderr.splitlines() if "mirror.service" in line] == []


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_snippet_creates_the_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    conf = (OPS / "mirror.sysusers.conf").read_text()
    res = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", "-"], input=conf, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    (passwd,) = [line for line in (tmp_path / "etc" / "passwd").read_text().splitlines() if line.startswith("mirror:")]
    assert passwd.split(":")[5] == "/var/lib/mirror"
    assert any(line.startswith("mirror:") for line in (tmp_path / "etc" / "group").read_text().splitlines())


def test_cronjob_runs_the_image_the_containerfile_builds() -> None:
    containerfile = (ROOT / "Containerfile").read_text()
    cronjob = (OPS / "cronjob.yaml").read_text()
    (image,) = re.findall(r"^\s+image: (\S+)$", cronjob, re.M)
    assert f"podman build -t {image} -f Containerfile ." in containerfile
    assert f"podman build -t {image} -f Containerfile ." in cronjob
    assert re.search(r"^FROM docker\.io/library/python:3\.11-slim$", containerfile, re.M)
    assert 'ENTRYPOINT ["mirror"]' in containerfile
    for copied in re.findall(r"^COPY (.+) /src/", containerfile, re.M):
        for name in copied.split():
            assert (ROOT / name).exists(), name
    user = re.search(r"^USER (\d+):(\d+)$", containerfile, re.M)
    assert user is not None and f"runAsUser: {user[1]}" in cronjob and f"fsGroup: {user[2]}" in cronjob
