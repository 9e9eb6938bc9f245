"""`mirror bundle create|import` progress off a terminal: JSON lines on stderr naming bytes done and total."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import Seeded
from tests.test_cli import mirror


def events(res: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """Return stderr's JSON lines, each checked for the fields every log line has."""
    out = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    for e in out:
        assert {"time", "level", "event"} <= set(e), e
    return out


def check_blobs(evs: list[dict[str, Any]], status: str, sizes: dict[str, int]) -> dict[str, Any]:
    """Check one `blob` line per blob of the bundle, bytes done growing to the total; return the `summary`."""
    blobs = [e for e in evs if e["event"] == "blob"]
    total = sum(sizes.values())
    assert sorted(e["digest"] for e in blobs) == sorted(sizes)
    assert {e["status"] for e in blobs} == {status}
    assert all(e["bytes"] == sizes[e["digest"]] and e["total"] == total for e in blobs)
    done = [e["done"] for e in blobs]
    assert done == sorted(done) and done[-1] == total
    assert done == [sum(e["bytes"] for e in blobs[: i + 1]) for i in range(len(blobs))]
    assert evs[-1]["event"] == "summary"  # the run ends with its summary
    return evs[-1]


def test_create_and_import_log_bytes_done_and_total(seeded: Seeded, tmp_path: Path) -> None:
    near, far = tmp_path / "near", tmp_path / "far"
    res = mirror("pull", "-q", "--cache", str(near), seeded.ref("t/schema2:1"), seeded.ref("t/index:1"))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "carry.tar"
    res = mirror("bundle", "create", "--cache", str(near), "-o", str(out), "--all")
    assert res.returncode == 0, res.stderr
    info = json.loads(mirror("bundle", "ls", "--json", str(out)).stdout)
    sizes = {b["digest"]: b["size"] for b in info["blobs"]}
    summary = check_blobs(events(res), "bundled", sizes)
    assert (summary["id"], summary["blobs"], summary["bytes"]) == (info["id"], len(sizes), sum(sizes.values()))
    assert summary["files"] == [str(out)]

    res = mirror("bundle", "import", str(out), "--cache", str(far))
    assert res.returncode == 0, res.stderr
    summary = check_blobs(events(res), "written", sizes)
    assert (summary["written"], summary["present"], summary["added"]) == (len(sizes), 0, 2)
    assert summary["bytes"] == sum(sizes.values())

    # Again: every blob is there already, and still counts towards the total.
    res = mirror("bundle", "import", str(out), "--cache", str(far))
    assert res.returncode == 0, res.stderr
    summary = check_blobs(events(res), "present", sizes)
    assert (summary["written"], summary["present"], summary["unchanged"]) == (0, len(sizes), 2)
