"""Streams a crafted `docker save` tar through the reader in this process, then prints the outcome and peak RSS.

`python -m tests.savetar_stress KIND CACHE` prints `ok` or `error: LINE`, then `hwm KIB` (VmHWM,
the process's peak resident memory). The tar is made on the fly, never held whole, so the peak
is the reader's.
"""

from __future__ import annotations

import asyncio
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

from mirror.errors import MirrorError
from mirror.sources.savetar import read_save
from mirror.store.layout import Layout

MIB = 1024 * 1024


def header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.GNU_FORMAT)


def member(name: str, data: bytes) -> bytes:
    return header(name, len(data)) + data + bytes(-len(data) % 512)


async def stream(kind: str) -> AsyncIterator[bytes]:
    if kind == "tiny":  # many one-byte members
        batch = []
        for i in range(200_000):
            batch.append(member(f"junk/{i}", b"x"))
            if len(batch) == 1000:
                yield b"".join(batch)
                batch = []
    elif kind == "json":  # JSON-looking members at the per-member cap, 240 MiB of them
        doc = b"{" + b" " * (4 * MIB - 2) + b"}"
        for i in range(60):
            yield member(f"j{i}.json", doc)
    elif kind == "small":  # small members (kept whatever they are), 240 MiB of them
        blob = b"\0" * (60 * 1024)
        for i in range(4000):
            yield member(f"s{i}", blob)
    elif kind == "bigjson":  # one 48 MiB JSON-looking member no image names, in a valid save
        yield header("big.json", 48 * MIB)
        yield b"{" + b" " * (MIB - 1)
        for _ in range(47):
            yield b" " * MIB
        yield member("manifest.json", b"[]")
    yield bytes(1024)


async def main(kind: str, cache: Path) -> None:
    layout = Layout.open(cache)
    try:
        await read_save(stream(kind), layout.blobs)
        print("ok")
    except MirrorError as exc:
        print(f"error: {exc}")
    status = Path("/proc/self/status").read_text()
    print("hwm", next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
