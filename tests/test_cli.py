"""The command line, run as a user runs it: exit codes, one-line errors, `ls` output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Seeded
from tools.registry import free_port


def mirror(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, env=env)


def test_bad_reference_is_usage_error(tmp_path: Path) -> None:
    res = mirror("pull", "--cache", str(tmp_path / "c"), "reg.example/App:1")
    assert res.returncode == 2
    assert (
        res.stderr.strip() == "mirror: invalid reference 'reg.example/App:1': repository name 'App' must be lowercase"
    )


def test_bad_platform_is_usage_error(tmp_path: Path) -> None:
    res = mirror("pull", "--cache", str(tmp_path / "c"), "--platform", "amd64", "reg.example/app:1")
    assert res.returncode == 2
    assert "invalid platform 'amd64'" in res.stderr


def test_nothing_reachable_exits_3(tmp_path: Path) -> None:
    res = mirror("pull", "--cache", str(tmp_path / "c"), f"127.0.0.1:{free_port()}/a:1")
    assert res.returncode == 3
    assert "FAILED" in res.stderr and "cannot reach" in res.stderr


def test_ls_refuses_a_directory_that_is_not_a_cache(tmp_path: Path) -> None:
    res = mirror("ls", "--cache", str(tmp_path))
    assert res.returncode == 1
    assert res.stderr.strip() == f"mirror: {tmp_path} is not a cache: no oci-layout file"


def test_pull_refuses_a_non_empty_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    res = mirror("pull", "--cache", str(tmp_path), "127.0.0.1:1/a:1")
    assert res.returncode == 1
    assert "is not empty and is not an OCI layout" in res.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "index.json").exists()


@pytest.mark.slow
def test_pull_then_ls(seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    refs = [seeded.ref("t/schema2:1"), seeded.ref("t/index:1"), seeded.ref("nope/missing:1")]
    res = mirror("pull", "--cache", str(cache), *refs)
    assert res.returncode == 1, res.stderr
    assert f"FAILED {seeded.ref('nope/missing:1')}" in res.stderr
    assert "2/3 images cached, 1 failed" in res.stderr
    res = mirror("ls", "--cache", str(cache))
    assert res.returncode == 0
    lines = sorted(res.stdout.splitlines())
    assert len(lines) == 2
    index_line = next(line for line in lines if "t/index:1" in line).split("\t")
    assert index_line[1] == seeded.digests["t/index:1"]
    assert index_line[2] == "linux/amd64,linux/arm64"
    schema2_line = next(line for line in lines if "t/schema2:1" in line).split("\t")
    assert schema2_line[:3] == [seeded.ref("t/schema2:1"), seeded.digests["t/schema2:1"], "linux/amd64"]
    # The same, for scripts.
    res = mirror("ls", "--json", "--cache", str(cache))
    assert res.returncode == 0, res.stderr
    listed = {img["name"]: img for img in json.loads(res.stdout)}
    assert listed[seeded.ref("t/index:1")]["digest"] == seeded.digests["t/index:1"]
    assert listed[seeded.ref("t/index:1")]["platforms"] == ["linux/amd64", "linux/arm64"]
    assert listed[seeded.ref("t/schema2:1")]["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert all(img["size"] > 0 and img["problem"] is None for img in listed.values())


def test_insecure_flag_keeps_the_configured_credentials(tmp_path: Path) -> None:
    import argparse

    from mirror.commands.common import load_config

    cfg_file = tmp_path / "m.toml"
    cfg_file.write_text('[[registries]]\nhost = "reg.example:5000"\nusername = "u"\npassword = "p"\napi = "v1"\n')
    args = argparse.Namespace(config=cfg_file, cache=None, insecure=["reg.example:5000", "other.example"])
    regs = {r.host: r for r in load_config(args).registries}
    assert regs["reg.example:5000"].insecure and regs["reg.example:5000"].username == "u"
    assert regs["reg.example:5000"].password == "p" and regs["reg.example:5000"].api == "v1"
    assert regs["other.example"].insecure and regs["other.example"].username is None
