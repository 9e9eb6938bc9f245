"""Planning, pure: from manifests to the unique blobs to copy."""

from __future__ import annotations

from collections.abc import Iterable

from mirror.digest import Digest
from mirror.manifest import Descriptor, ImageManifest


def plan_blobs(images: Iterable[ImageManifest]) -> tuple[Descriptor, ...]:
    """Return every blob the images reference, each digest once, in first-seen order.

    Where one manifest gives a blob's size and another does not (schema1), the known
    size wins so the download can be checked against it.
    """
    seen: dict[Digest, Descriptor] = {}
    for image in images:
        for desc in image.blobs:
            have = seen.get(desc.digest)
            if have is None or (have.size < 0 <= desc.size):
                seen[desc.digest] = desc
    return tuple(seen.values())
