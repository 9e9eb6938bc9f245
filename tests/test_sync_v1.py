"""A v1 registry as a sync job's source: incremental runs keyed by the tag's image id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirror import config
from mirror.errors import UsageError
from tests.conftest import ROOT
from tests.test_v1 import chain, layer_gets
from tests.v1server import V1Registry
from tools.imagebuild import random_layer


def sync(cfg: Path, report: Path) -> dict[str, dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mirror", "sync", "-q", "-c", str(cfg), "--report", str(report)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    return {str(i["reference"]): i for i in json.loads(report.read_text())["images"]}


@pytest.mark.slow
def test_v1_job_fetches_once_then_one_tag_lookup_per_run(tmp_path: Path) -> None:
    store, ids, _ = chain(3, 900)
    store.tag("chain/img", "2", ids[1])  # a second tag: the image below the top one
    reg = V1Registry(store).start()
    try:
        cfg = tmp_path / "mirror.toml"
        cfg.write_text(
            f'[cache]\npath = "{tmp_path / "cache"}"\n'
            f'[[registries]]\nhost = "{reg.host}"\napi = "v1"\n'
            f'[[jobs]]\nname = "legacy"\nsource = {{type = "registry", host = "{reg.host}"}}\n'
            'repositories = ["chain/img"]\ntags = { include = [".*"] }\n'
        )
        report = tmp_path / "run.json"
        first = sync(cfg, report)
        assert {k: v["status"] for k, v in first.items()} == {
            f"{reg.host}/chain/img:1": "ok",
            f"{reg.host}/chain/img:2": "ok",
        }
        assert layer_gets(reg) == {i: 1 for i in ids}  # the shared base layers once
        # Nothing changed: the host's v1 ping, the tag listing and one tag lookup per tag; no json, no layer.
        reg.requests.clear()
        second = sync(cfg, report)
        assert {v["status"] for v in second.values()} == {"unchanged"}
        assert second[f"{reg.host}/chain/img:1"]["digest"] == f"v1:{ids[-1]}"
        gets = sorted(p for (m, p), n in reg.requests.items() for _ in range(n) if m == "GET")
        tags = "/v1/repositories/chain/img/tags"
        assert gets == sorted(["/v1/_ping", tags, f"{tags}/1", f"{tags}/2"])
        # Tag 2 moves to a new image on top of the old top: only the new image is fetched.
        new = store.add(random_layer(8_000, 999).blob, ids[-1], "add one more", seed="900")
        store.tag("chain/img", "2", new)
        reg.requests.clear()
        third = sync(cfg, report)
        assert third[f"{reg.host}/chain/img:1"]["status"] == "unchanged"
        assert third[f"{reg.host}/chain/img:2"]["status"] == "ok"
        assert layer_gets(reg) == {new: 1}
        # The moved tag is looked up by the check and once more by the pull, which pulls that very id.
        assert reg.count("/v1/repositories/chain/img/tags/2") == 2
    finally:
        reg.stop()


def test_v1_job_refuses_what_v1_cannot_do(tmp_path: Path) -> None:
    head = '[[registries]]\nhost = "old.example:5000"\napi = "v1"\n[[jobs]]\nname = "j"\n'
    src = 'source = {type = "registry", host = "old.example:5000"}\n'
    for body, message in [
        ('repositories = { catalog = true, include = ["x/.*"] }\n', "which has no catalog; list the repositories"),
        ('repositories = ["x/y"]\nreferrers = true\n', "referrers = true: a v1 registry has no"),
    ]:
        with pytest.raises(UsageError, match=message):
            config.parse(tomllib_loads(head + src + body), "mirror.toml")
    # A one-component name gets v1's library/ rule, as `mirror pull` gives it.
    cfg = config.parse(tomllib_loads(head + src + 'repositories = ["ubuntu"]\n'), "mirror.toml")
    assert cfg.jobs[0].spec.repositories.names == ("library/ubuntu",)
    assert cfg.jobs[0].source.v1


def tomllib_loads(text: str) -> dict[str, object]:
    import tomllib

    return tomllib.loads(text)
