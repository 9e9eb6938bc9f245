"""`make demo`: a local registry with sample images, mirrored into ./demo/cache by `mirror pull`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tools.imagebuild import Layout, random_layer
from tools.registry import Registry, skopeo_copy

MiB = 1 << 20


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main() -> int:
    """Build sample images, seed a registry on 127.0.0.1:5000 (or a free port), mirror them."""
    root = Path("demo")
    shutil.rmtree(root, ignore_errors=True)
    reg = Registry(root / "registry", port=5000 if _port_free(5000) else None).start()
    try:
        print(f"registry: docker-registry on {reg.host} (data in {reg.data})")
        src = Layout(root / "src")
        base = random_layer(24 * MiB, 1)
        src.tag("ubuntu", src.image([base, random_layer(4 * MiB, 2), random_layer(2 * MiB, 3)], empty_history=2))
        amd = src.image([random_layer(6 * MiB, 10)], arch="amd64")
        arm = src.image([random_layer(6 * MiB, 11)], arch="arm64", os_name="linux")
        src.tag("busybox", src.index([amd, arm]))
        src.tag("app", src.image([base, random_layer(3 * MiB, 20)]))
        h = reg.host
        skopeo_copy(f"oci:{src.root}:ubuntu", f"docker://{h}/ubuntu:15.10", "--format", "v2s2")
        skopeo_copy(f"oci:{src.root}:ubuntu", f"docker://{h}/legacy/ubuntu:schema1", "--format", "v2s1")
        skopeo_copy(f"oci:{src.root}:busybox", f"docker://{h}/tools/busybox:1", "--all")
        skopeo_copy(f"oci:{src.root}:app", f"docker://{h}/apps/web:2", "--format", "v2s2")
        refs = [f"{h}/ubuntu:15.10", f"{h}/legacy/ubuntu:schema1", f"{h}/tools/busybox:1", f"{h}/apps/web:2"]
        cache = root / "cache"
        print("$ mirror pull " + " ".join(refs) + f" --cache {cache}", flush=True)
        rc = subprocess.call([sys.executable, "-m", "mirror", "pull", *refs, "--cache", str(cache)])
        print(f"$ mirror ls --cache {cache}", flush=True)
        subprocess.call([sys.executable, "-m", "mirror", "ls", "--cache", str(cache)])
        out = root / "readback"
        print(f"$ skopeo copy oci:{cache}:{refs[0]} dir:{out}", flush=True)
        skopeo_copy(f"oci:{cache}:{refs[0]}", f"dir:{out}")
        print(f"skopeo read {len(list(out.iterdir()))} files back from the cache")
        return rc
    finally:
        reg.stop()


if __name__ == "__main__":
    sys.exit(main())
