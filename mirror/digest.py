"""Content digests (`sha256:<64 hex>`) as a pure value type."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from mirror.errors import DigestError

_HEX = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
_LOWER_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """An `algorithm:hex` content digest."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Return the digest `text` names, or raise DigestError saying what is wrong."""
        m = _DIGEST_RE.match(text)
        if not m:
            raise DigestError(f"malformed digest {text!r}: expected ALGORITHM:HEX")
        algo, hexd = m.group(1), m.group(2)
        want = _HEX.get(algo)
        if want is None:
            raise DigestError(f"unsupported digest algorithm {algo!r} in {text!r}")
        if len(hexd) != want or not _LOWER_HEX.fullmatch(hexd):
            raise DigestError(f"malformed digest {text!r}: {algo} needs {want} lowercase hex characters")
        return cls(algo, hexd)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        """Return the sha256 digest of `data`."""
        return cls("sha256", hashlib.sha256(data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        """Return a fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        """Return the first 12 hex characters, as tools show digests."""
        return self.hex[:12]


EMPTY_LAYER = Digest("sha256", "a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4")
