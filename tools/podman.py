"""`podman system service` as the Docker daemon of the tests and the benchmark, on a socket of our own."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def start_service(podman: Sequence[str], sock: Path, log: Path, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """Start `PODMAN system service` on `sock` (output to `log`); return once `/_ping` answers OK.

    `podman` is the start of the command line (`["podman"]`, or with `--root`... for storage
    of one's own). Raise RuntimeError with the end of the log when it does not come up.
    """
    if shutil.which("podman") is None:
        raise RuntimeError("podman is not installed (apt-get install podman)")
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [*podman, "system", "service", "--time=0", f"unix://{sock}"], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                if b"OK" in s.recv(4096):
                    return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_service(proc)
                raise RuntimeError(f"podman service did not start: {log.read_text(errors='replace')[-2000:]}") from None
            time.sleep(0.1)


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    """Stop a service `start_service` started."""
    if proc.poll() is None:
        proc.terminate()
        proc.wait(15)


@contextmanager
def podman_service(root: Path) -> Iterator[Path]:
    """Run the service (the machine's podman storage) on `root/podman.sock` for the block; yield the socket."""
    sock = root / "podman.sock"
    proc = start_service(["podman"], sock, root / "service.log")
    try:
        yield sock
    finally:
        stop_service(proc)
