"""The local cloud's token authority: Google's signing key, access tokens, and known principals.

ID tokens are RS256 JWTs signed by one key whose self-signed X.509 certificate is
published at the certs URL, exactly the format `google.oauth2.id_token.verify_token`
reads. Access tokens are opaque strings, as Google's are, mapped to their principal
here. Service-account key files and authorized-user files are registered so the
token endpoint can check what clients present.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from localcloud.recording import Recorder

ISSUER = "https://accounts.google.com"
TOKEN_LIFETIME_S = 3600


def _new_key() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return key, pem


def _self_signed_cert(key: rsa.RSAPrivateKey, common_name: str) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def numeric_id(email: str) -> str:
    """A stable 21-digit id for a principal, like Google's `sub` claim."""
    return str(int(hashlib.sha256(email.encode()).hexdigest(), 16))[:21]


@dataclass(frozen=True)
class UserGrant:
    email: str
    client_id: str
    client_secret: str
    refresh_token: str


class TokenAuthority:
    """Mints and recognises every token of the local cloud. Thread-safe."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._lock = threading.Lock()
        key, pem = _new_key()
        self.key_id = hashlib.sha1(pem.encode()).hexdigest()
        self._signer = crypt.RSASigner.from_string(pem, key_id=self.key_id)
        self.certs_json = json.dumps(
            {self.key_id: _self_signed_cert(key, "local-cloud.googleusercontent.com")}
        ).encode()
        self._access: dict[str, tuple[str, float]] = {}
        # private_key_id -> (service account email, its certificate PEM)
        self._sa_keys: dict[str, tuple[str, str]] = {}
        self._users: dict[str, UserGrant] = {}
        self._subjects: dict[str, str] = {}

    # -- minting -------------------------------------------------------------

    def mint_id_token(
        self,
        email: str,
        audience: str,
        *,
        include_email: bool = True,
        azp: str | None = None,
        lifetime_s: int = TOKEN_LIFETIME_S,
    ) -> str:
        sub = self._subject(email)
        now = int(time.time())
        claims: dict[str, object] = {
            "aud": audience,
            "azp": azp or sub,
            "exp": now + lifetime_s,
            "iat": now,
            "iss": ISSUER,
            "sub": sub,
        }
        if include_email:
            claims.update(email=email, email_verified=True)
        token = self.sign(claims)
        self._recorder.count_id_token(audience)
        return token

    def sign(self, claims: dict[str, object]) -> str:
        """Any claims as an RS256 JWT under Google's (this cloud's) key: for tests of verifiers."""
        return jwt.encode(self._signer, claims).decode()

    def mint_access_token(self, email: str, lifetime_s: int = TOKEN_LIFETIME_S) -> str:
        token = "ya29.local." + secrets.token_urlsafe(32)
        with self._lock:
            self._access[token] = (email, time.time() + lifetime_s)
        self._recorder.count_access_token()
        return token

    # -- registration --------------------------------------------------------

    def new_service_account_key(self, email: str) -> tuple[str, str]:
        """Create a key pair for `email`; returns (private_key_id, private key PEM)."""
        key, pem = _new_key()
        key_id = secrets.token_hex(20)
        cert = _self_signed_cert(key, email)
        with self._lock:
            self._sa_keys[key_id] = (email, cert)
        return key_id, pem

    def new_user(self, email: str) -> UserGrant:
        grant = UserGrant(
            email=email,
            client_id=f"{secrets.randbelow(10**12):012d}-local.apps.googleusercontent.com",
            client_secret="local-" + secrets.token_urlsafe(18),
            refresh_token="1//local-" + secrets.token_urlsafe(32),
        )
        with self._lock:
            self._users[grant.refresh_token] = grant
        return grant

    # -- recognition ---------------------------------------------------------

    def user_for_refresh(self, client_id: str, client_secret: str, refresh_token: str) -> UserGrant:
        with self._lock:
            grant = self._users.get(refresh_token)
        if grant is None or (grant.client_id, grant.client_secret) != (client_id, client_secret):
            raise ValueError("Bad Request: unknown refresh token or client")
        return grant

    def verify_signed_by_key_file(self, token: str, audience: str | list[str] | None) -> dict:
        """Claims of a JWT signed with a registered service-account key; ValueError if not."""
        header = jwt.decode_header(token)
        with self._lock:
            entry = self._sa_keys.get(header.get("kid", ""))
        if entry is None:
            raise ValueError("Invalid JWT Signature: unknown key id")
        email, cert = entry
        claims = jwt.decode(token, certs={header["kid"]: cert}, audience=audience)
        if claims.get("iss") != email:
            raise ValueError(f"Invalid JWT: iss {claims.get('iss')!r} does not own this key")
        return claims

    def principal_for_bearer(self, token: str) -> str | None:
        """Who a Google API would take this bearer to be: a live access token we minted,
        or a self-signed JWT from a registered key file (what google-auth sends for
        service-account keys when a client library asks for JWT access). ID tokens are
        not API credentials."""
        with self._lock:
            entry = self._access.get(token)
        if entry is not None:
            email, expires_at = entry
            return email if time.time() < expires_at else None
        try:
            return str(self.verify_signed_by_key_file(token, audience=None)["iss"])
        except (ValueError, KeyError):
            return None

    def email_for_subject(self, sub: str) -> str | None:
        with self._lock:
            return self._subjects.get(sub)

    def describe(self, token: str) -> tuple[str | None, str | None]:
        """(unverified audience, principal email) of any token, for the request log."""
        with self._lock:
            entry = self._access.get(token)
        if entry is not None:
            return None, entry[0]
        try:
            claims = jwt.decode(token, verify=False)
        except (ValueError, TypeError):
            return None, None
        aud = claims.get("aud")
        iss = str(claims.get("iss", ""))
        email = (
            claims.get("email")
            or self.email_for_subject(str(claims.get("sub", "")))
            # a self-signed key-file JWT names its service account as issuer
            or (iss if "@" in iss else None)
        )
        return (str(aud) if aud is not None else None), email

    def _subject(self, email: str) -> str:
        sub = numeric_id(email)
        with self._lock:
            self._subjects[sub] = email
        return sub
