"""podman's Docker API service as the benchmark's Docker daemon, with its storage in a directory of ours.

As in tests/test_daemon.py, `podman system service --time=0 unix://SOCKET` serves the
Engine API and images go into podman's storage with `skopeo copy oci:... containers-storage:...`.
Unlike the tests, storage is private (`--root`/`--runroot`/`--tmpdir` under `root`), so the
benchmark never touches the machine's shared podman images and removes all it added.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

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
        if shutil.which("podman") is None:
            raise RuntimeError("podman is not installed (apt-get install podman)")
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.root / "service.log", "wb")  # noqa: SIM115 - closed in stop()
        cmd = [*self.podman(), "system", "service", "--time=0", self.url]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                    s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                    if b"OK" in s.recv(4096):
                        return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = (self.root / "service.log").read_text(errors="replace")
                    raise RuntimeError(f"podman service did not start: {log[-2000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the service; unmount and remove the storage."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        if self.proc:
            self._log.close()
        # The overlay driver bind-mounts its own directory; nothing else is left mounted.
        subprocess.run(["umount", str(self.storage / "overlay")], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
