"""podman's Docker API service as the benchmark's Docker daemon, with its storage in a directory of ours.

As in tests/test_daemon.py, `podman system service --time=0 unix://SOCKET` serves the
Engine API and images go into podman's storage with `skopeo copy oci:... containers-storage:...`.
Unlike the tests, storage is private (`--root`/`--runroot`/`--tmpdir` under `root`), so the
benchmark never touches the machine's shared podman images and removes all it added.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tools.podman import start_service, stop_service
from tools.registry import skopeo_copy


class PodmanService:
    """`podman system service` on `root/podman.sock`, its storage under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "podman.sock"
        self.storage = root / "storage"
        self.runroot = root / "run"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Return the service's address as DOCKER_HOST spells it."""
        return f"unix://{self.socket}"

    def podman(self) -> list[str]:
        """Return the start of a `podman` command line that uses this storage."""
        tmp = self.root / "tmp"
        return ["podman", "--root", str(self.storage), "--runroot", str(self.runroot), "--tmpdir", str(tmp)]

    def load(self, layout: Path, name: str, ref: str) -> None:
        """Copy the image `name` of the OCI layout `layout` into this storage as `ref`."""
        skopeo_copy(f"oci:{layout}:{name}", f"containers-storage:[overlay@{self.storage}+{self.runroot}]{ref}")

    def start(self) -> PodmanService:
        """Start the service and wait until `/_ping` answers OK."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.proc = start_service(self.podman(), self.socket, self.root / "service.log")
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the service; unmount and remove the storage."""
        if self.proc:
            stop_service(self.proc)
        # The overlay driver bind-mounts its own directory; nothing else is left mounted.
        subprocess.run(["umount", str(self.storage / "overlay")], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
