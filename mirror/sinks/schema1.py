"""Signing a schema1 payload for a registry push (libtrust JWS, as Docker and containers/image do).

The cache keeps schema1 manifests as their payload without signatures: the payload's
sha256 is the digest the source reported. distribution refuses an unsigned schema1 PUT
(it parses and verifies the JWS), but any key will do: it checks the signature against
the key in the header, never who owns the key. So the payload is signed with a fresh
throwaway P-256 key; the registry digests the payload, so the pushed manifest keeps the
source digest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from mirror.errors import ManifestError


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Return libtrust's key id: sha256 of the DER SubjectPublicKeyInfo, 240 bits, base32, groups of 4."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(text[i : i + 4] for i in range(0, len(text), 4))


def sign_schema1(payload: bytes) -> bytes:
    """Return `payload` (a schema1 manifest without signatures) signed as a libtrust pretty JWS.

    The protected header's `formatLength` and `formatTail` let the registry cut the
    payload back out byte for byte (libtrust `NewJSONSignature` / `PrettySignature`).
    """
    close = len(payload.rstrip())
    if close == 0 or payload[close - 1 : close] != b"}":
        raise ManifestError("schema1 payload does not end with a JSON object")
    body_end = len(payload[: close - 1].rstrip())
    if payload[body_end - 1 : body_end] == b",":
        raise ManifestError("schema1 payload has a trailing comma before its closing brace")
    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    jwk = {
        "crv": "P-256",
        "kid": libtrust_key_id(key.public_key()),
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }
    protected = {
        "formatLength": body_end,
        "formatTail": _b64url(payload[body_end:]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    protected_b64 = _b64url(json.dumps(protected, separators=(",", ":")).encode())
    # JWS signing input: BASE64URL(protected) "." BASE64URL(payload); ES256 is r || s, 32 bytes each.
    r, s = decode_dss_signature(key.sign(f"{protected_b64}.{_b64url(payload)}".encode(), ec.ECDSA(hashes.SHA256())))
    signature = _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    sigs = [{"header": {"jwk": jwk, "alg": "ES256"}, "signature": signature, "protected": protected_b64}]
    return payload[:body_end] + b',\n   "signatures": ' + json.dumps(sigs, indent=3).encode() + b"\n}"
