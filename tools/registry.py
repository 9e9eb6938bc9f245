"""Start the real `docker-registry` (CNCF distribution 2.8) on a free loopback port."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    """A docker-registry process with its data and log in `root`."""

    def __init__(self, root: Path, *, auth: str = "", port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.data = root / "data"
        self.log_path = root / "registry.log"
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "config.yml"
        self.config.write_text(
            "version: 0.1\n"
            "log: {level: info, accesslog: {disabled: true}}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.data}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: {self.host}}}\n"
            "compatibility: {schema1: {enabled: true}}\n" + auth
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Registry:
        """Start the registry and wait until `/v2/` answers."""
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "serve", str(self.config)], stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
                return self
            except urllib.error.HTTPError:
                return self  # 401: up, with auth
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not start in 15 s")

    def stop(self) -> None:
        """Stop the registry process."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc:
            self._log.close()

    def requests(self) -> Counter[tuple[str, str]]:
        """Count (method, uri) of every completed request in the log so far.

        The registry writes a request's line just after the client has its answer: the log
        is read once it has stopped growing for 50 ms, so a request a test has just made is
        counted now, not in the next count (where it would look like a second request).
        """
        size, deadline = -1, time.monotonic() + 2
        while (now := self.log_path.stat().st_size) != size and time.monotonic() < deadline:
            size = now
            time.sleep(0.05)
        out: Counter[tuple[str, str]] = Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "response completed" not in line:
                continue
            m = re.search(r"http\.request\.method=(\w+)", line)
            # logrus quotes a value only when it has characters like ':' (digests), not tags.
            u = re.search(r'http\.request\.uri=(?:"([^"]+)"|(\S+))', line)
            if m and u:
                out[(m.group(1), u.group(1) or u.group(2))] += 1
        return out

    def blob_path(self, digest: str) -> Path:
        """Return the file the registry keeps blob `digest` in."""
        hexd = digest.split(":", 1)[1]
        return self.data / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


def skopeo_copy(src: str, dest: str, *extra: str) -> None:
    """Run `skopeo copy` with TLS checks off for loopback registries; raise with its stderr on failure."""
    cmd = ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", *extra, src, dest]
    if not (src.startswith("docker://")):
        cmd.remove("--src-tls-verify=false")
    if not (dest.startswith("docker://")):
        cmd.remove("--dest-tls-verify=false")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
