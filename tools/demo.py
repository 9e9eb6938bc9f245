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


# What `make demo` puts in its registry (and tests/test_readme.py in its own, smaller):
# names as the README's examples use them.
DEMO_NAMES = ["ubuntu:15.10", "legacy/ubuntu:schema1", "tools/busybox:1", "apps/web:2"]


def seed(host: str, work: Path, unit: int = MiB) -> list[str]:
    """Build the demo images under `work` (layer sizes in multiples of `unit`), push them to `host`; return refs.

    `ubuntu:15.10` (schema2, a base layer shared with `apps/web:2`), the same image as
    schema1 (`legacy/ubuntu:schema1`), and `tools/busybox:1`, an index of amd64 and arm64.
    """
    src = Layout(work)
    base = random_layer(24 * unit, 1)
    src.tag("ubuntu", src.image([base, random_layer(4 * unit, 2), random_layer(2 * unit, 3)], empty_history=2))
    amd = src.image([random_layer(6 * unit, 10)], arch="amd64")
    arm = src.image([random_layer(6 * unit, 11)], arch="arm64", os_name="linux")
    src.tag("busybox", src.index([amd, arm]))
    src.tag("app", src.image([base, random_layer(3 * unit, 20)]))
    skopeo_copy(f"oci:{src.root}:ubuntu", f"docker://{host}/ubuntu:15.10", "--format", "v2s2")
    skopeo_copy(f"oci:{src.root}:ubuntu", f"docker://{host}/legacy/ubuntu:schema1", "--format", "v2s1")
    skopeo_copy(f"oci:{src.root}:busybox", f"docker://{host}/tools/busybox:1", "--all")
    skopeo_copy(f"oci:{src.root}:app", f"docker://{host}/apps/web:2", "--format", "v2s2")
    return [f"{host}/{name}" for name in DEMO_NAMES]


def main() -> int:
    """Build sample images, seed a registry on 127.0.0.1:5000 (or a free port), mirror them."""
    root = Path("demo")
    shutil.rmtree(root, ignore_errors=True)
    reg = Registry(root / "registry", port=5000 if _port_free(5000) else None).start()
    try:
        print(f"registry: docker-registry on {reg.host} (data in {reg.data})")
        refs = seed(reg.host, root / "src")
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
