"""A bearer-token issuer for tests (Docker token auth spec), signing RS256 JWTs docker-registry accepts.

The registry (`auth.token`) trusts the certificate in `rootcertbundle` and finds it by
the JWT header's `kid`: the libtrust key id (sha256 of the DER SubjectPublicKeyInfo,
first 30 bytes, base32, 12 groups of 4 joined by `:`). Users and grants are plain
dicts; every token request is recorded so tests can count them. It runs its own event
loop in a thread, so blocking calls in tests (skopeo) can use it too.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.faultproxy import start_site


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_kid(key: rsa.RSAPublicKey) -> str:
    """Return the libtrust key id docker-registry uses to match a JWT `kid` to a trusted key."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i : i + 4] for i in range(0, 48, 4))


@dataclass
class TokenRequest:
    """One request the issuer answered."""

    method: str
    user: str
    scopes: tuple[str, ...]
    status: int
    grant: str = ""


@dataclass
class TokenIssuer:
    """Issues tokens for `service` as `issuer`; `grants` maps user ("" = anonymous) to (repo prefix, actions)."""

    root: Path
    service: str = "test-registry"
    issuer: str = "test-issuer"
    users: dict[str, str] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    grants: dict[str, list[tuple[str, tuple[str, ...]]]] = field(default_factory=dict)
    expires_in: int = 300
    expired_next: int = 0  # issue this many tokens already expired (past the registry's 60 s leeway)
    requests: list[TokenRequest] = field(default_factory=list)
    host: str = ""

    def __post_init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(self._key, hashes.SHA256())
        )
        self.bundle = self.root / "issuer.pem"
        self.root.mkdir(parents=True, exist_ok=True)
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.kid = libtrust_kid(self._key.public_key())
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def realm(self) -> str:
        """Return the token endpoint URL."""
        return f"http://{self.host}/token"

    def registry_auth(self) -> str:
        """Return the `auth:` section of a docker-registry config trusting this issuer."""
        return (
            f"auth: {{token: {{realm: {self.realm}, service: {self.service}, issuer: {self.issuer}, "
            f"rootcertbundle: {self.bundle}}}}}\n"
        )

    def start(self) -> TokenIssuer:
        """Serve on a free loopback port from a background thread."""
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_route("*", "/token", self._handle)
            self._runner, port = self._loop.run_until_complete(start_site(app))
            self.host = f"127.0.0.1:{port}"
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="token-issuer", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)

    def count(self, *, user: str | None = None, scope: str | None = None, method: str | None = None) -> int:
        """Return how many token requests match."""
        return sum(
            1
            for r in self.requests
            if (user is None or r.user == user)
            and (scope is None or scope in r.scopes)
            and (method is None or r.method == method)
        )

    def sign(self, user: str, access: list[dict[str, object]]) -> str:
        """Return an RS256 JWT for `user` with `access` claims."""
        now = int(time.time())
        if self.expired_next > 0:
            self.expired_next -= 1
            now -= 7200
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(sig)}"

    def _allowed(self, user: str, scope: str) -> dict[str, object] | None:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository":
            return None
        want = set(actions.split(","))
        ok: set[str] = set()
        for prefix, acts in self.grants.get(user, []):
            if name.startswith(prefix):
                ok |= want & set(acts)
        return {"type": "repository", "name": name, "actions": sorted(ok)} if ok else None

    async def _handle(self, request: web.Request) -> web.Response:
        user, grant = "", ""
        if request.method == "POST":
            form = await request.post()
            scopes = tuple(str(form.get("scope", "")).split())
            grant = str(form.get("grant_type", ""))
            user = self.refresh_tokens.get(str(form.get("refresh_token", "")), "")
            if grant != "refresh_token" or not user:
                self.requests.append(TokenRequest("POST", "?", scopes, 401, grant))
                return web.json_response({"error": "invalid_grant"}, status=401)
        else:
            scopes = tuple(request.query.getall("scope", []))
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                if self.users.get(name) != password:
                    self.requests.append(TokenRequest("GET", name, scopes, 401))
                    return web.json_response({"details": "incorrect username or password"}, status=401)
                user = name
        access = [a for s in scopes if (a := self._allowed(user, s)) is not None]
        token = self.sign(user, access)
        self.requests.append(TokenRequest(request.method, user, scopes, 200, grant))
        body = {"token": token, "access_token": token, "expires_in": self.expires_in}
        return web.json_response(body)
