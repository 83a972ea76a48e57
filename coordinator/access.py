"""Access control for a private run: the run key, join tokens, and short-lived access certificates.

Trust chain (each link is checked by the code named after it):

1. The coordinator owns the run's **Ed25519 key** (``CHECKPOINT_DIR/run_key.pem``, created on first use, mode 0600).
2. The run's owner creates **join tokens** with ``convforever-coordinator token create``. A token reads
   ``cf1.<id>.<secret>.<fingerprint>``: the coordinator stores only sha256(secret) (`TokenStore`), and the
   fingerprint is the first 32 hex digits of sha256(run public key). A token is handed out of band, so the
   fingerprint it carries is how a peer knows the run key it is later sent is the real one, whatever URL or
   DHT record pointed it at the coordinator.
3. A peer proves its **libp2p identity** when it asks for a certificate: it sends its RSA public key (the key its
   libp2p peer id is the multihash of, `peer_id_of_key`) and a signature with it over the request; the
   coordinator checks both (`Issuer.issue`), so a certificate is only ever bound to a peer id its holder owns.
4. The **certificate** ``{run_id, peer_id, key, token_id, issued_at, expires_at}`` is signed by the run key
   (canonical JSON + detached signature, never pickle) and lives ``ttl`` seconds (default 10 minutes); peers
   renew it at half-life. A revoked token gets no renewal, and verifiers also consult the revocation list the
   coordinator signs and publishes (`Revocations`), so a revoked peer is shut out within one refresh rather than
   at the certificate's expiry.
5. Verifiers never trust a claim of identity: libp2p authenticates the remote peer id of every connection
   (``P2PContext.remote_id``), the DHT's requests are signed with the key the certificate names, and HTTP calls
   carry the certificate plus a signature over (method, path, time, body) with that key (`verify_request`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

TOKEN_PREFIX = "cf1"
CERT_DOMAIN = b"convforever-certificate-v1\n"
REVOKED_DOMAIN = b"convforever-revocations-v1\n"
REQUEST_DOMAIN = b"convforever-request-v1\n"
CERT_REQUEST_DOMAIN = b"convforever-certificate-request-v1\n"
DEFAULT_TTL = 600.0  # seconds a certificate lives: a revoked peer is out within this even if no one reads revocations
MAX_CLOCK_SKEW = 120.0  # seconds a signed request's time may differ from ours
CERT_HEADER = "X-ConvForever-Certificate"
TIME_HEADER = "X-ConvForever-Time"
SIGNATURE_HEADER = "X-ConvForever-Signature"

_RSA_PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class AccessError(Exception):
    """A refused credential; ``status`` is the HTTP status to answer with, the message says what to do next."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode())


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def fingerprint(public_key: bytes) -> str:
    """What a join token carries to pin the run key: 128 bits of sha256, enough against a second preimage."""
    return hashlib.sha256(public_key).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- peer keys (RSA)


def rsa_public_der(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def peer_id_of_key(public_der: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key: the sha2-256 multihash of its protobuf encoding.

    Same computation as hivemind's ``PeerID.from_identity``, from the public half only, so the coordinator can
    check that the key a peer shows is the key its peer id stands for.
    """
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2

    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    return PeerID(b"\x12\x20" + hashlib.sha256(encoded).digest()).to_base58()


def load_rsa_public(public_der: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(public_der)
    except ValueError:
        raise AccessError(400, "the key is not a DER-encoded public key; use convforever-peer's own client") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise AccessError(400, "the key must be the RSA key of the peer's libp2p identity")
    return key


def rsa_sign(key: rsa.RSAPrivateKey, data: bytes) -> str:
    return _b64(key.sign(data, _RSA_PADDING, hashes.SHA256()))


def rsa_verify(key: rsa.RSAPublicKey, data: bytes, signature: str) -> bool:
    try:
        key.verify(_unb64(signature), data, _RSA_PADDING, hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------- the run key


class RunKey:
    """The coordinator's Ed25519 signing key; the public half is what every verifier pins."""

    def __init__(self, private: ed25519.Ed25519PrivateKey) -> None:
        self.private = private
        self.public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.fingerprint = fingerprint(self.public)

    @classmethod
    def load_or_create(cls, path: Path) -> "RunKey":
        path = Path(path)
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise ValueError(f"{path} is not an Ed25519 run key; move it away to create a new one "
                                 "(every join token issued with the old key stops working)")
            return cls(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return cls(key)

    def sign(self, domain: bytes, payload: bytes) -> str:
        return _b64(self.private.sign(domain + payload))


def verify_run_signature(run_public: bytes, domain: bytes, payload: bytes, signature: str) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(run_public).verify(_unb64(signature), domain + payload)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certificate:
    run_id: str
    peer_id: str  # libp2p peer id, base58
    key: str  # base64url DER of the peer's RSA public key (its libp2p identity)
    token_id: str
    issued_at: float
    expires_at: float
    signature: str = field(default="", compare=False)

    def fields(self) -> dict:
        out = asdict(self)
        out.pop("signature")
        return out

    def to_wire(self) -> str:
        """Compact JSON with the signature beside the signed fields; safe in an HTTP header and a DHT value."""
        return json.dumps({"cert": self.fields(), "sig": self.signature}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_wire(cls, wire: str | bytes) -> "Certificate":
        try:
            outer = json.loads(wire)
            return cls(**outer["cert"], signature=str(outer["sig"]))
        except (ValueError, TypeError, KeyError):
            raise AccessError(401, "the certificate is malformed; restart the peer with --token to get a new one") from None

    def public_key(self) -> rsa.RSAPublicKey:
        return load_rsa_public(_unb64(self.key))


def sign_certificate(run_key: RunKey, cert: Certificate) -> Certificate:
    fields = cert.fields()
    return Certificate(**fields, signature=run_key.sign(CERT_DOMAIN, _canonical(fields)))


def verify_certificate(cert: Certificate, run_public: bytes, run_id: str, now: Optional[float] = None,
                       revoked: frozenset[str] = frozenset()) -> Certificate:
    """Return the certificate if the run key signed it for this run and it is live; raise AccessError if not."""
    now = time.time() if now is None else now
    if not verify_run_signature(run_public, CERT_DOMAIN, _canonical(cert.fields()), cert.signature):
        raise AccessError(401, "the certificate's signature is not the run key's; get a new one with --token")
    if cert.run_id != run_id:
        raise AccessError(401, f"the certificate is for run {cert.run_id!r}, not {run_id!r}; use this run's token")
    if cert.expires_at <= now:
        raise AccessError(401, "the certificate has expired; the peer renews it by itself when the coordinator "
                               "is reachable (restart it with --token if it has been offline)")
    if cert.token_id in revoked:
        raise AccessError(403, f"join token {cert.token_id} was revoked; ask the run's owner for a new token")
    return cert


@dataclass(frozen=True)
class Revocations:
    """The revoked token ids, signed by the run key so a peer can pass the list on without being trusted."""

    run_id: str
    token_ids: tuple[str, ...]
    issued_at: float
    signature: str = ""

    def fields(self) -> dict:
        return {"run_id": self.run_id, "token_ids": sorted(self.token_ids), "issued_at": self.issued_at}

    def to_wire(self) -> str:
        return json.dumps({"revoked": self.fields(), "sig": self.signature}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def signed(cls, run_key: RunKey, run_id: str, token_ids: list[str]) -> "Revocations":
        unsigned = cls(run_id, tuple(sorted(token_ids)), time.time())
        return cls(**{**unsigned.fields(), "token_ids": unsigned.token_ids},
                   signature=run_key.sign(REVOKED_DOMAIN, _canonical(unsigned.fields())))

    @classmethod
    def from_wire(cls, wire: str | bytes, run_public: bytes, run_id: str) -> Optional["Revocations"]:
        """The list if the run key signed it for this run, else None (an unsigned list is ignored, not obeyed)."""
        try:
            outer = json.loads(wire)
            inner = outer["revoked"]
            found = cls(str(inner["run_id"]), tuple(str(t) for t in inner["token_ids"]), float(inner["issued_at"]),
                        str(outer["sig"]))
        except (ValueError, TypeError, KeyError):
            return None
        if found.run_id != run_id or not verify_run_signature(run_public, REVOKED_DOMAIN, _canonical(found.fields()),
                                                              found.signature):
            return None
        return found


# ---------------------------------------------------------------------------------------------- join tokens


@dataclass(frozen=True)
class JoinToken:
    token_id: str
    secret: str
    fingerprint: str

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.token_id}.{self.secret}.{self.fingerprint}"

    @classmethod
    def parse(cls, text: str) -> "JoinToken":
        parts = text.strip().split(".")
        if len(parts) != 4 or parts[0] != TOKEN_PREFIX or not all(parts[1:]):
            raise AccessError(401, "this is not a ConvForever join token (they read cf1.ID.SECRET.FINGERPRINT); "
                                   "copy the whole token the run's owner gave you")
        return cls(*parts[1:])


SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, name TEXT NOT NULL,
                                   created REAL NOT NULL, revoked REAL);
"""


@dataclass
class TokenInfo:
    token_id: str
    name: str
    created: float
    revoked: Optional[float]


class TokenStore:
    """Join tokens in SQLite (``CHECKPOINT_DIR/access.sqlite``): only a hash of each secret is stored."""

    def __init__(self, path: Path, fingerprint_: str, clock: Callable[[], float] = time.time) -> None:
        self.path, self.fingerprint, self.clock = Path(path), fingerprint_, clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def create(self, name: str = "") -> JoinToken:
        token = JoinToken(secrets.token_hex(4), secrets.token_urlsafe(24).replace(".", "_"), self.fingerprint)
        with self.lock:
            self.db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, NULL)",
                            (token.token_id, hashlib.sha256(token.secret.encode()).hexdigest(), name, self.clock()))
        return token

    def revoke(self, token_id: str) -> bool:
        """True if a live token was revoked; certificates already issued with it stop being renewed."""
        with self.lock:
            cur = self.db.execute("UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL",
                                  (self.clock(), token_id))
        return cur.rowcount == 1

    def list(self) -> list[TokenInfo]:
        with self.lock:
            rows = self.db.execute("SELECT id, name, created, revoked FROM tokens ORDER BY created").fetchall()
        return [TokenInfo(*row) for row in rows]

    def revoked_ids(self) -> list[str]:
        with self.lock:
            return [row[0] for row in self.db.execute("SELECT id FROM tokens WHERE revoked IS NOT NULL")]

    def is_revoked(self, token_id: str) -> bool:
        with self.lock:
            row = self.db.execute("SELECT revoked FROM tokens WHERE id = ?", (token_id,)).fetchone()
        return row is not None and row[0] is not None

    def check(self, text: str) -> str:
        """The token's id if it is one of ours and live; AccessError saying what to do otherwise."""
        token = JoinToken.parse(text)
        if token.fingerprint != self.fingerprint:
            raise AccessError(401, "this join token belongs to another run (its key fingerprint differs); "
                                   "ask this run's owner for a token")
        with self.lock:
            row = self.db.execute("SELECT secret_sha256, revoked FROM tokens WHERE id = ?", (token.token_id,)).fetchone()
        digest = hashlib.sha256(token.secret.encode()).hexdigest()
        if row is None or not hmac.compare_digest(row[0], digest):
            raise AccessError(401, "unknown join token; check you copied it whole, or ask the run's owner for a new one")
        if row[1] is not None:
            raise AccessError(403, f"join token {token.token_id} was revoked; ask the run's owner for a new token")
        return token.token_id

    def close(self) -> None:
        with self.lock:
            self.db.close()


# ---------------------------------------------------------------------------------------------- the issuer


def certificate_request_payload(run_id: str, peer_id: str, key: str, at: float) -> bytes:
    return CERT_REQUEST_DOMAIN + _canonical({"run_id": run_id, "peer_id": peer_id, "key": key, "time": at})


def request_payload(method: str, path: str, at: float, body: bytes) -> bytes:
    return REQUEST_DOMAIN + f"{method.upper()}\n{path}\n{at!r}\n{hashlib.sha256(body).hexdigest()}".encode()


@dataclass
class Issuer:
    """Exchanges join tokens for certificates and checks them on the coordinator's side."""

    run_id: str
    run_key: RunKey
    tokens: TokenStore
    ttl: float = DEFAULT_TTL
    clock: Callable[[], float] = time.time

    def issue(self, token: str, peer_id: str, key: str, at: float, proof: str) -> Certificate:
        token_id = self.tokens.check(token)
        public = load_rsa_public(_unb64(key)) if key else None
        if public is None or peer_id_of_key(_unb64(key)) != peer_id:
            raise AccessError(400, f"the key sent is not the key of peer id {peer_id}; use convforever-peer's own client")
        if abs(at - self.clock()) > MAX_CLOCK_SKEW:
            raise AccessError(400, "the request's time is more than 2 minutes off the coordinator's clock; "
                                   "synchronise this machine's clock (NTP) and retry")
        if not rsa_verify(public, certificate_request_payload(self.run_id, peer_id, key, at), proof):
            raise AccessError(401, "the request is not signed by the key of the peer id it names")
        return self.self_issue(peer_id, key, token_id)

    def self_issue(self, peer_id: str, key: str, token_id: str = "coordinator") -> Certificate:
        now = self.clock()
        return sign_certificate(self.run_key, Certificate(self.run_id, peer_id, key, token_id, now, now + self.ttl))

    def revocations(self) -> Revocations:
        return Revocations.signed(self.run_key, self.run_id, self.tokens.revoked_ids())

    def check_certificate(self, wire: str) -> Certificate:
        cert = Certificate.from_wire(wire)
        verify_certificate(cert, self.run_key.public, self.run_id, self.clock())
        if cert.token_id != "coordinator" and self.tokens.is_revoked(cert.token_id):
            raise AccessError(403, f"join token {cert.token_id} was revoked; ask the run's owner for a new token")
        return cert

    def verify_request(self, method: str, path: str, headers, body: bytes) -> Certificate:
        """The caller's certificate, if the request carries a live one and is signed with its key; else AccessError."""
        wire = headers.get(CERT_HEADER)
        if not wire:
            raise AccessError(401, "this run is private: this call needs the peer's access certificate; start "
                                   "convforever-peer with --token TOKEN (or CONVFOREVER_TOKEN) from the run's owner")
        try:
            cert = self.check_certificate(_unb64(wire).decode())
        except (ValueError, UnicodeDecodeError):
            raise AccessError(401, "the certificate header is malformed; use convforever-peer's own client") from None
        try:
            at = float(headers.get(TIME_HEADER, ""))
        except ValueError:
            raise AccessError(401, f"the request has no {TIME_HEADER}; use convforever-peer's own client") from None
        if abs(at - self.clock()) > MAX_CLOCK_SKEW:
            raise AccessError(401, "the request's time is more than 2 minutes off the coordinator's clock; "
                                   "synchronise this machine's clock (NTP)")
        if not rsa_verify(cert.public_key(), request_payload(method, path, at, body), headers.get(SIGNATURE_HEADER, "")):
            raise AccessError(401, "the request is not signed by the certificate's key (a certificate alone is "
                                   "public: it proves nothing without the key); use convforever-peer's own client")
        return cert


def request_headers(key: rsa.RSAPrivateKey, cert_wire: str, method: str, path: str, body: bytes,
                    at: Optional[float] = None) -> dict[str, str]:
    """What a peer adds to an HTTP call to the coordinator of a private run (checked by `Issuer.verify_request`)."""
    at = time.time() if at is None else at
    return {CERT_HEADER: _b64(cert_wire.encode()), TIME_HEADER: repr(at),
            SIGNATURE_HEADER: rsa_sign(key, request_payload(method, path, at, body))}


def run_key_path(checkpoint_dir: Path) -> Path:
    return Path(checkpoint_dir) / "run_key.pem"


def tokens_path(checkpoint_dir: Path) -> Path:
    return Path(checkpoint_dir) / "access.sqlite"


def open_issuer(run_id: str, checkpoint_dir: Path, ttl: float = DEFAULT_TTL) -> Issuer:
    """The run's key and token store under CHECKPOINT_DIR (created on first use), as an Issuer."""
    run_key = RunKey.load_or_create(run_key_path(checkpoint_dir))
    return Issuer(run_id, run_key, TokenStore(tokens_path(checkpoint_dir), run_key.fingerprint), ttl=ttl)
