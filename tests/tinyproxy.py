"""Start the real `tinyproxy` (Debian package) on a free loopback port; read which requests went through it."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tools.registry import free_port


class TinyProxy:
    """A tinyproxy process in the foreground, with its config and log in `root`.

    No `ConnectPort` line: CONNECT to any port is allowed (registries on high ports).
    With `auth`, it answers 407 to requests without `Proxy-Authorization: Basic USER:PASS`.
    """

    def __init__(self, root: Path, *, auth: tuple[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "tinyproxy.log"
        self.config = root / "tinyproxy.conf"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 60",
            f'LogFile "{self.log_path}"',
            "LogLevel Connect",  # one `Request (file descriptor N): METHOD URI` line per request
            "MaxClients 64",
        ]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self) -> TinyProxy:
        """Start tinyproxy and wait until its port accepts connections."""
        binary = shutil.which("tinyproxy")
        if binary is None:
            raise RuntimeError("tinyproxy is not installed (apt-get install tinyproxy)")
        self._out = open(self.root / "stdout.txt", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "-d", "-c", str(self.config)], stdout=self._out, stderr=self._out)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tinyproxy exited: {(self.root / 'stdout.txt').read_text()[-2000:]}") from None
                time.sleep(0.05)
        raise RuntimeError("tinyproxy did not start in 10 s")

    def stop(self) -> None:
        """Stop the tinyproxy process."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc:
            self._out.close()

    def requests(self) -> list[tuple[str, str]]:
        """Return (method, URI) of every request tinyproxy has logged so far (CONNECT: HOST:PORT)."""
        if not self.log_path.exists():
            return []
        out = []
        text = self.log_path.read_bytes()[self._offset :].decode(errors="replace")
        for line in text.splitlines():
            m = re.search(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/", line)
            if m:
                out.append((m.group(1), m.group(2)))
        return out

    def clear(self) -> None:
        """Forget the requests logged so far (the log is read from its current end on)."""
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
