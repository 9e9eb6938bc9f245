"""Referrers (signatures, SBOMs, attestations): the pure part of the OCI distribution spec v1.1.

A referrer is a manifest whose `subject` names another manifest. A registry lists them at
`GET /v2/NAME/referrers/DIGEST` ("Listing Referrers"); one without that API keeps an OCI
index under the tag `ALG-HEX` of the subject instead ("Referrers Tag Schema"); cosign's
classic scheme tags them `sha256-HEX.sig`, `.att` and `.sbom`. No I/O here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from mirror.digest import Digest
from mirror.errors import DigestError
from mirror.manifest import OCI_INDEX
from mirror.reference import Reference

# cosign's tag suffixes: signatures, attestations (in-toto), attached SBOMs.
COSIGN_SUFFIXES = (".sig", ".att", ".sbom")


_REFERRER_TAG = re.compile(r"sha256-[0-9a-f]{64}(?:\.sig|\.att|\.sbom)?")


def is_referrer_tag(tag: str) -> bool:
    """Return whether `tag` is a fallback index's or a cosign tag (`sha256-<hex>[.sig|.att|.sbom]`)."""
    return _REFERRER_TAG.fullmatch(tag) is not None


def fallback_tag(subject: Digest) -> str:
    """Return the referrers tag schema's tag of `subject`: `sha256-<hex>` (spec: `<alg>-<ref>`, truncated to 128)."""
    return f"{subject.algorithm}-{subject.hex}"[:128]


def cosign_tags(subject: Digest) -> tuple[str, ...]:
    """Return cosign's tags of `subject`'s signature, attestation and SBOM (`sha256-<hex>.sig`, ...)."""
    return tuple(fallback_tag(subject) + s for s in COSIGN_SUFFIXES)


@dataclass(frozen=True, slots=True)
class ReferrerInfo:
    """What the referrers API says about one manifest that refers to another."""

    media_type: str
    digest: Digest
    size: int
    artifact_type: str
    subject: Digest
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """Return the descriptor the referrers index lists (with `artifactType` and annotations)."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


def referrer_info(raw: bytes, media_type: str, digest: Digest) -> ReferrerInfo | None:
    """Return how manifest `raw` is listed as a referrer, or None when it has no valid `subject`.

    `artifactType` is the manifest's own, else (an image manifest) its config's media type,
    as the spec asks the referrers API to report.
    """
    if b'"subject"' not in raw:  # most manifests: no JSON parse needed
        return None
    try:
        doc = msgspec.json.decode(raw, type=_ReferrerDoc)
    except (msgspec.MsgspecError, RecursionError):
        return None
    if doc.subject is None:
        return None
    try:
        subject = Digest.parse(doc.subject.digest)
    except DigestError:
        return None
    artifact = doc.artifactType or (doc.config.mediaType if doc.config is not None else "") or ""
    return ReferrerInfo(media_type, digest, len(raw), artifact, subject, doc.annotations or {})


class _SubjectDoc(msgspec.Struct):
    digest: str


class _ConfigTypeDoc(msgspec.Struct):
    mediaType: str | None = None


class _ReferrerDoc(msgspec.Struct):
    """The fields of a manifest that list it as a referrer."""

    subject: _SubjectDoc | None = None
    artifactType: str | None = None
    config: _ConfigTypeDoc | None = None
    annotations: dict[str, str] | None = None


def referrers_index(referrers: Iterable[ReferrerInfo], artifact_type: str | None = None) -> bytes:
    """Return the OCI index the referrers API answers, filtered by `artifact_type` when given."""
    kept = [r.to_json() for r in referrers if artifact_type is None or r.artifact_type == artifact_type]
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kept}
    return json.dumps(doc, separators=(",", ":")).encode()


def orphaned_referrers(
    names: dict[str, Digest],
    removed: set[str],
    subject_of: Callable[[str], Digest | None],
    listed_in: Callable[[str], Iterable[Digest]] = lambda _name: (),
) -> list[str]:
    """Return the cached names that only refer to images being removed (signatures of a dropped image).

    `names` maps every cached name to the digest of the image it names (the source's);
    `subject_of(name)` returns a digest-named referrer's `subject` (None: not a referrer).
    A referrer goes when nothing left names its subject: cosign and fallback tags by the
    digest in their tag (`R:sha256-<hex>[.sig|.att|.sbom]`), digest-named referrers by
    their `subject`; referrers of those referrers follow, as far as they go. `listed_in(name)`
    returns the manifests a name's index lists (a fallback tag's referrers, cached with it but
    not named): a signature of one of those goes with the index.
    """
    gone = set(removed)

    def held(name: str) -> set[Digest]:
        return {names[name], *listed_in(name)}

    while True:
        kept = {d for n in names if n not in gone for d in held(n)}
        dropped = {d for n in names if n in gone for d in held(n)} - kept
        more = []
        for name in names:
            if name in gone:
                continue
            ref = Reference.parse(name)
            if ref.digest is None and ref.tag is not None and is_referrer_tag(ref.tag):
                target: Digest | None = Digest("sha256", ref.tag.removeprefix("sha256-").split(".", 1)[0])
            elif ref.digest is not None:
                target = subject_of(name)
            else:
                continue
            if target is not None and target in dropped:
                more.append(name)
        if not more:
            return sorted(gone - removed)
        gone.update(more)
