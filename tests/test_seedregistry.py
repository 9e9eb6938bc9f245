"""tools/seedregistry.py writes a storage tree the real docker-registry serves as pushed images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import inspect_digest, registry_digest
from tools.seedregistry import seeded_registry


def test_seeded_tags_read_back_with_their_digests(tmp_path: Path) -> None:
    reg, digests = seeded_registry(tmp_path / "reg", 20, repo="seed/app")
    try:
        assert len(digests) == 20 and len(set(digests.values())) == 20  # distinct images
        listed = subprocess.run(
            ["skopeo", "list-tags", "--tls-verify=false", f"docker://{reg.host}/seed/app"],
            capture_output=True,
            check=True,
        ).stdout
        assert sorted(json.loads(listed)["Tags"]) == sorted(digests)
        for tag in ("t000000", "t000019"):
            assert inspect_digest(f"docker://{reg.host}/seed/app:{tag}") == digests[tag]
            assert registry_digest(reg.host, f"seed/app:{tag}") == digests[tag]
        # The config and the layer are served through the repository, with the right bytes.
        out = subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--config", f"docker://{reg.host}/seed/app:t000007"],
            capture_output=True,
            check=True,
        ).stdout
        assert json.loads(out)["config"]["Labels"] == {"seed": "t000007"}
        dest = tmp_path / "copy"
        subprocess.run(
            ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{reg.host}/seed/app:t000003", f"dir:{dest}"],
            check=True,
            capture_output=True,
        )
        assert (dest / "manifest.json").exists()
    finally:
        reg.stop()
