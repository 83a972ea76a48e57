"""A peer's side of a private run: its certificate, and the checks every RPC it serves or calls makes.

How a peer gets in (the trust chain is in `convforever.coordinator.access`):
  * `PeerIdentity` is the libp2p key the peer's DHT runs with (a fresh one per process unless a file is given);
  * `AccessClient` exchanges the join token (``--token`` or ``CONVFOREVER_TOKEN``) at ``--coordinator URL`` for a
    certificate bound to that key, checks that the run key it is sent matches the fingerprint inside the token,
    keeps the certificate and the run's revocation list in a small state file, renews the certificate at
    half-life, and publishes it in the DHT under ``{run}_certs`` (subkey: the peer id) so others can check it.

What it checks:
  * DHT: `CertificateAuthorizer` (hivemind's TokenAuthorizerBase) signs each DHT request and response with the
    identity key and attaches the certificate; requests and answers without a live certificate for the signing key
    are dropped, so an uncertified process cannot read or write the run's records, nor bootstrap from us.
  * Averaging and state download: `AuthorizedAveragerMixin` refuses ``rpc_join_group``, ``rpc_aggregate_part`` and
    ``rpc_download_state`` from a caller whose libp2p peer id (authenticated by the transport) has no live,
    unrevoked certificate (`CertificateVerifier`, fed from the DHT), refuses to all-reduce in a group that contains
    such a peer, and never downloads state from one.
  * Coordinator HTTP calls: `RequestSigner` adds the certificate and a signature with the identity key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, crypto_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from convforever.compression.guard import FixedDhtRead
from convforever.coordinator.access import (
    AccessError,
    Certificate,
    JoinToken,
    Revocations,
    _b64,
    _unb64,
    certificate_request_payload,
    fingerprint,
    peer_id_of_key,
    request_headers,
    rsa_public_der,
    rsa_sign,
    verify_certificate,
)

logger = logging.getLogger(__name__)

TOKEN_ENV = "CONVFOREVER_TOKEN"


class AccessDenied(ValueError):
    """The peer cannot join the private run; the message says what to do (the CLIs print it and exit)."""


def certs_key(run_id: str) -> str:
    return f"{run_id}_certs"


def revoked_key(run_id: str) -> str:
    return f"{run_id}_revoked"


# ---------------------------------------------------------------------------------------------- identity


@dataclass
class PeerIdentity:
    """The libp2p identity (an RSA key in hivemind's file format) a private-run member's DHT is started with.

    The certificate names this key's peer id, and libp2p proves that id on every connection, so the identity must
    exist before the DHT starts: hivemind.DHT(identity_path=...) then runs as exactly this peer.
    """

    path: Path
    key: rsa.RSAPrivateKey

    @classmethod
    def load_or_create(cls, path: Path) -> "PeerIdentity":
        path = Path(path)
        if not path.exists():
            from hivemind.p2p import P2P

            P2P.generate_identity(str(path))
        der = crypto_pb2.PrivateKey.FromString(path.read_bytes()).data
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise AccessDenied(f"{path} is not an RSA libp2p identity; remove it to create a new one")
        return cls(path, key)

    @property
    def public_b64(self) -> str:
        return _b64(rsa_public_der(self.key.public_key()))

    @property
    def peer_id(self) -> str:
        return peer_id_of_key(rsa_public_der(self.key.public_key()))

    def hivemind_key(self) -> RSAPrivateKey:
        """The same key as hivemind's own RSAPrivateKey type (what its authorizer signs with)."""
        wrapped = RSAPrivateKey.__new__(RSAPrivateKey)
        wrapped._private_key = self.key
        return wrapped


# ---------------------------------------------------------------------------------------------- the state file


@dataclass
class AccessState:
    """What the main process learned from the coordinator, shared with the DHT process and data workers by file."""

    certificate: str
    run_key: str  # hex
    revocations: Optional[str] = None

    def save(self, path: Path) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps({"certificate": self.certificate, "run_key": self.run_key,
                                   "revocations": self.revocations}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "AccessState":
        return cls(**json.loads(Path(path).read_text()))


def revoked_ids(wire: Optional[str], run_public: bytes, run_id: str) -> frozenset[str]:
    found = Revocations.from_wire(wire, run_public, run_id) if wire else None
    return frozenset(found.token_ids) if found is not None else frozenset()


# ---------------------------------------------------------------------------------------------- DHT authorizer


class CertificateAuthorizer(TokenAuthorizerBase):
    """hivemind's DHT authorizer with our certificate as the access token.

    The token's ``username`` carries the certificate, ``public_key`` the key that signs each request; a token is
    valid when the run key signed the certificate for this run, it is live and unrevoked, and it names that very
    key. It runs inside the DHT's process: it reads our own certificate from the state file the main process
    keeps renewing (re-read whenever the file changes), so nothing needs to cross the process boundary.
    """

    def __init__(self, identity: PeerIdentity, state_path: Path, run_id: str, run_public: bytes) -> None:
        super().__init__(identity.hivemind_key())
        self.state_path, self.run_id, self.run_public = Path(state_path), run_id, run_public
        self._loaded_mtime: Optional[int] = None
        self._revoked: frozenset[str] = frozenset()

    def _mtime(self) -> Optional[int]:
        try:
            return os.stat(self.state_path).st_mtime_ns
        except OSError:
            return None

    async def get_token(self) -> AccessToken:
        self._loaded_mtime = self._mtime()
        state = AccessState.load(self.state_path)
        self._revoked = revoked_ids(state.revocations, self.run_public, self.run_id)
        cert = Certificate.from_wire(state.certificate)
        return AccessToken(username=state.certificate, public_key=self.local_public_key.to_bytes(),
                           expiration_time=repr(cert.expires_at))

    def is_token_valid(self, access_token: AccessToken) -> bool:
        try:
            cert = verify_certificate(Certificate.from_wire(access_token.username), self.run_public, self.run_id,
                                      get_dht_time(), self._revoked)
            signer = serialization.load_ssh_public_key(access_token.public_key)
        except (AccessError, ValueError, TypeError):
            return False
        return isinstance(signer, rsa.RSAPublicKey) and rsa_public_der(signer) == _unb64(cert.key)

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        try:
            expires_at = float(access_token.expiration_time)
        except ValueError:
            return True
        return self._mtime() != self._loaded_mtime or expires_at - get_dht_time() < 30


# ---------------------------------------------------------------------------------------------- verifying peers


@dataclass
class CertificateVerifier:
    """Who may average with us and download our state: peers with a live, unrevoked certificate of this run.

    Certificates come from the DHT (``{run}_certs``, published by each peer) and are checked against the run key,
    so a forged or stale DHT record admits no one. The revocation list comes from the DHT too (``{run}_revoked``,
    signed by the run key). Lookups for unknown peers re-read the DHT at most every ``refresh_every`` seconds, so
    an intruder hammering our handlers costs us one DHT read per interval, not one per request.
    """

    run_id: str
    run_public: bytes
    refresh_every: float = 2.0
    revocations_every: float = 30.0  # seconds between background re-reads while everyone checked is admitted
    _certs: dict[str, Certificate] = field(default_factory=dict, repr=False)
    _revoked: Optional[Revocations] = field(default=None, repr=False)
    _refreshed_at: float = field(default=-1e9, repr=False)
    _refreshing: Optional[asyncio.Future] = field(default=None, repr=False, compare=False)

    @property
    def revoked(self) -> frozenset[str]:
        return frozenset(self._revoked.token_ids) if self._revoked is not None else frozenset()

    def learn(self, wire: Any) -> None:
        """Cache a certificate if the run key signed it for this run (anything else is dropped silently)."""
        try:
            cert = verify_certificate(Certificate.from_wire(wire), self.run_public, self.run_id, get_dht_time())
        except (AccessError, TypeError):
            return
        known = self._certs.get(cert.peer_id)
        if known is None or known.expires_at < cert.expires_at:
            self._certs[cert.peer_id] = cert

    def learn_revocations(self, wire: Any) -> None:
        found = Revocations.from_wire(wire, self.run_public, self.run_id) if isinstance(wire, (str, bytes)) else None
        if found is not None and (self._revoked is None or found.issued_at >= self._revoked.issued_at):
            self._revoked = found

    def reason(self, peer_id: str) -> Optional[str]:
        """None if the peer may take part, else why not (from the cache only)."""
        cert = self._certs.get(peer_id)
        if cert is None:
            return "no certificate of this run"
        try:
            verify_certificate(cert, self.run_public, self.run_id, get_dht_time(), self.revoked)
        except AccessError as e:
            return str(e)
        return None

    async def refresh(self, dht) -> None:
        self._refreshed_at = time.monotonic()
        self._learn_records(await dht.get(certs_key(self.run_id), latest=True, return_future=True),
                            await dht.get(revoked_key(self.run_id), latest=True, return_future=True))

    def prefill(self, dht) -> None:
        """Read the DHT once, synchronously, before an averager's process forks with a copy of this verifier.

        Without it the first round's handlers all wait for a first DHT read, and on a loaded machine that can
        outlast matchmaking: the first step would be taken alone.
        """
        try:
            self._learn_records(dht.get(certs_key(self.run_id), latest=True),
                                dht.get(revoked_key(self.run_id), latest=True))
        except Exception as e:  # no worse than an empty cache: the first check reads the DHT again
            logger.debug(f"could not read certificates from the DHT: {e!r}")

    def _learn_records(self, certs, revoked) -> None:
        if certs is not None and isinstance(certs.value, dict):
            for entry in certs.value.values():
                if isinstance(entry, ValueWithExpiration):
                    self.learn(entry.value)
        if revoked is not None:
            self.learn_revocations(revoked.value)

    async def _refresh_quietly(self, dht) -> None:
        try:
            await self.refresh(dht)
        except Exception as e:  # a DHT hiccup must not crash the averager: the peer is simply not admitted now
            logger.debug(f"could not read certificates from the DHT: {e!r}")

    async def check(self, dht, peer_id: PeerID | str) -> Optional[str]:
        """None if the peer may take part, else why not; re-reads the DHT when the cache says no.

        Checks that arrive while a re-read is in flight wait for it (a group's handlers all ask at once when the
        cache is still empty), rather than answering from the cache the re-read is about to fill.
        """
        peer = peer_id.to_base58() if isinstance(peer_id, PeerID) else str(peer_id)
        why = self.reason(peer)
        idle = self._refreshing is None or self._refreshing.done()
        if why is None:
            if idle and time.monotonic() - self._refreshed_at >= self.revocations_every:
                # admitted from the cache: re-read in the background, so a revocation reaches us within this period
                self._refreshed_at = time.monotonic()
                self._refreshing = asyncio.ensure_future(self._refresh_quietly(dht))
            return None
        if idle:
            if time.monotonic() - self._refreshed_at < self.refresh_every:
                return why
            self._refreshing = asyncio.ensure_future(self._refresh_quietly(dht))
        await asyncio.shield(self._refreshing)
        return self.reason(peer)


# ---------------------------------------------------------------------------------------------- averagers


class AuthorizedAveragerMixin:
    """Put first in a hivemind averager's bases: only certified peers may average with it or download its state.

    Compose as ``class X(AuthorizedAveragerMixin, SomeAverager)`` (e.g. ``GuardedTrainingStateAverager`` or
    ``CountingPowerSGDGradientAverager``) and construct with ``access=CertificateVerifier(...)``; with
    ``access=None`` (a public run) it checks nothing, so composing it into the classes every run uses is safe.
    An averager built elsewhere can be given the checks before it starts with `start_authorized`.

    Pinned to hivemind 1.1.12: the three RPC handlers and ``_aggregate_with_group`` keep their signatures (type
    hints included: ServicerBase reads them to name the protocols) and ``_load_state_from_peers`` reads the donors
    from ``self.dht.get(f"{prefix}.all_averagers")``.
    """

    _access: Optional[CertificateVerifier] = None

    def __init__(self, *args: Any, access: Optional[CertificateVerifier] = None, **kwargs: Any) -> None:
        self._access = access  # before hivemind's __init__, which may fork the averager's process
        super().__init__(*args, **kwargs)

    async def _refuse_uncertified(self, peer_id: PeerID, what: str) -> None:
        if self._access is None:
            return
        why = await self._access.check(self.dht, peer_id)
        if why is not None:
            logger.warning(f"refused to let {peer_id} {what}: {why}")
            raise PermissionError(f"peer {peer_id} may not {what} in private run {self._access.run_id}: {why}. "
                                  "Only peers that joined with a join token (--token) take part")

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        await self._refuse_uncertified(context.remote_id, "join an averaging group")
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        await self._refuse_uncertified(context.remote_id, "send tensors for averaging")
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(
        self, _request: averaging_pb2.DownloadRequest, _context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        await self._refuse_uncertified(_context.remote_id, "download the state")
        async for message in super().rpc_download_state(_request, _context):
            yield message

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any):
        if self._access is not None:
            for peer_id in group_info.peer_ids:
                why = await self._access.check(self.dht, peer_id)
                if why is not None:
                    logger.warning(f"not averaging in a group with {peer_id}: {why}")
                    raise AllreduceException(f"group member {peer_id} is not certified for this run: {why}")
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    async def _load_state_from_peers(self, future, timeout: Optional[float] = None, **kwargs: Any):
        if self._access is None:
            return await super()._load_state_from_peers(future, timeout=timeout, **kwargs)
        key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
        found = await self.dht.get(key, latest=True, return_future=True)
        donors = {}
        if found is not None and isinstance(found.value, dict):
            for peer_bytes, info in found.value.items():
                try:
                    why = await self._access.check(self.dht, PeerID(peer_bytes))
                except Exception as e:
                    why = repr(e)
                if why is None:
                    donors[peer_bytes] = info
                else:
                    logger.warning(f"not downloading the state from {PeerID(peer_bytes)}: {why}")
        real_dht = self.dht
        self.dht = FixedDhtRead(real_dht, key, ValueWithExpiration(donors, found.expiration_time) if donors else None)
        try:
            return await super()._load_state_from_peers(future, timeout=timeout, **kwargs)
        finally:
            self.dht = real_dht


@lru_cache(maxsize=None)
def authorized(cls: type) -> type:
    """``cls`` with `AuthorizedAveragerMixin` first, under the same class name.

    hivemind names an averager's RPC protocols after its class (``{prefix}::ClassName.rpc_join_group``), so keeping
    the name keeps the wire protocol: certified peers and the coordinator's state download address it unchanged.
    """
    if issubclass(cls, AuthorizedAveragerMixin):
        return cls
    return type(cls.__name__, (AuthorizedAveragerMixin, cls),
                {"__module__": cls.__module__, "__doc__": cls.__doc__, "_rpc_handlers": None, "_stub_type": None})


def start_authorized(averager, access: CertificateVerifier, timeout: Optional[float] = None):
    """Give an averager built with ``start=False`` the access checks, then start it (as ``start=True`` would)."""
    averager.__class__ = authorized(type(averager))
    access.prefill(averager.dht)
    averager._access = access
    averager.run_in_background(await_ready=True, timeout=timeout)
    return averager


@dataclass
class AuthorizedFactory:
    """Wraps a ``grad_averager_factory``: the averager it builds gets the access checks before it starts."""

    factory: Callable[..., Any]
    access: CertificateVerifier

    def __call__(self, **kwargs: Any):
        return start_authorized(self.factory(**{**kwargs, "start": False}), self.access)


# ---------------------------------------------------------------------------------------------- the client


def _post(url: str, body: Optional[dict], timeout: float) -> tuple[int, dict]:
    """(status, JSON answer); raises OSError when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            answer = json.loads(e.read() or b"{}")
        except ValueError:
            answer = {}
        return e.code, answer if isinstance(answer, dict) else {}
    except (urllib.error.URLError, ValueError) as e:
        raise OSError(str(e)) from None


@dataclass
class RequestSigner:
    """Signs a peer's HTTP calls to the coordinator; picklable into DataLoader workers (the key travels as DER)."""

    key_der: bytes
    state_path: Path
    _last: Optional[str] = field(default=None, repr=False)  # the certificate last read (the file goes at exit)

    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        try:
            self._last = AccessState.load(self.state_path).certificate
        except (OSError, ValueError):
            pass
        if self._last is None:
            return {}  # the coordinator answers 401 with what to do
        key = serialization.load_der_private_key(self.key_der, password=None)
        return request_headers(key, self._last, method, path, body)


class AccessClient:
    """Holds this peer's certificate: the first exchange at start, then renewal and publication in the background."""

    def __init__(self, url: str, token: str, run_id: str, identity: PeerIdentity, state_path: Path,
                 timeout: float = 10.0, poll_every: float = 30.0) -> None:
        try:
            self.token = JoinToken.parse(token)
        except AccessError as e:
            raise AccessDenied(f"--token: {e}") from None
        self.url, self.run_id, self.identity = url.rstrip("/"), run_id, identity
        self.state_path, self.timeout, self.poll_every = Path(state_path), timeout, poll_every
        self.cert: Optional[Certificate] = None
        self.run_public = b""
        self.revocations: Optional[str] = None
        self.revoked = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def exchange(self) -> Certificate:
        """Trade the join token for a certificate; AccessDenied with what to do when that is impossible."""
        at = time.time()
        key = self.identity.public_b64
        body = {"token": str(self.token), "peer_id": self.identity.peer_id, "key": key, "time": at,
                "proof": rsa_sign(self.identity.key, certificate_request_payload(self.run_id, self.identity.peer_id,
                                                                                  key, at))}
        try:
            status, answer = _post(f"{self.url}/api/v1/certificate", body, self.timeout)
        except OSError as e:
            raise AccessDenied(f"could not reach the coordinator at {self.url} to exchange the join token ({e}): "
                               "check --coordinator URL and that the coordinator is running; a private run cannot "
                               "be joined without it") from None
        error = answer.get("error", "")
        if status == 404:
            raise AccessDenied(f"the coordinator at {self.url} hands out no certificates: the run is public (drop "
                               "--token) or the URL is not this run's coordinator")
        if status in (401, 403):
            self.revoked = status == 403
            raise AccessDenied(f"the coordinator at {self.url} refused the join token: {error}")
        if status != 200:
            raise AccessDenied(f"the coordinator at {self.url} answered HTTP {status} {error}: retry, or check "
                               "--coordinator URL")
        try:
            run_public = bytes.fromhex(answer["run_key"])
            if fingerprint(run_public) != self.token.fingerprint:
                raise AccessDenied(f"the coordinator at {self.url} signs with a run key that is not the one your "
                                   "token names: this URL is not your run's coordinator (or someone is in between); "
                                   "check --coordinator URL with the run's owner")
            cert = verify_certificate(Certificate.from_wire(answer["certificate"]), run_public, self.run_id)
        except (KeyError, ValueError, TypeError, AccessError) as e:
            if isinstance(e, AccessDenied):
                raise
            raise AccessDenied(f"the coordinator at {self.url} sent an unusable certificate ({e}); check that "
                               f"--run-id {self.run_id} is the run the token belongs to") from None
        if cert.peer_id != self.identity.peer_id:
            raise AccessDenied("the coordinator certified another peer id; retry, or report this to the run's owner")
        self.cert, self.run_public = cert, run_public
        self.revocations = answer.get("revocations") or self.revocations
        self._save()
        return cert

    def _save(self) -> None:
        assert self.cert is not None
        AccessState(self.cert.to_wire(), self.run_public.hex(), self.revocations).save(self.state_path)

    def verifier(self) -> CertificateVerifier:
        verifier = CertificateVerifier(self.run_id, self.run_public)
        if self.revocations:
            verifier.learn_revocations(self.revocations)
        return verifier

    def signer(self) -> RequestSigner:
        der = self.identity.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
        return RequestSigner(der, self.state_path)

    def authorizer(self) -> CertificateAuthorizer:
        return CertificateAuthorizer(self.identity, self.state_path, self.run_id, self.run_public)

    def publish(self, dht) -> None:
        """Put our certificate where verifiers look for it (they check the run key's signature, not who stored it)."""
        if self.cert is not None:
            dht.store(certs_key(self.run_id), subkey=self.cert.peer_id, value=self.cert.to_wire(),
                      expiration_time=self.cert.expires_at, return_future=True)

    def start(self, dht) -> None:
        self.publish(dht)
        self._thread = threading.Thread(target=self._renew_loop, args=(dht,), name="access-renewal", daemon=True)
        self._thread.start()

    def _renew_loop(self, dht) -> None:
        while not self._stop.wait(self.poll_every):
            assert self.cert is not None
            try:
                status, answer = _post(f"{self.url}/api/v1/revocations", None, self.timeout)
                if status == 200 and answer.get("revocations"):
                    self.revocations = answer["revocations"]
                    self._save()
                lifetime = self.cert.expires_at - self.cert.issued_at
                if time.time() >= self.cert.issued_at + lifetime / 2:
                    self.exchange()
                    logger.info(f"renewed the access certificate (valid until {time.ctime(self.cert.expires_at)})")
            except OSError as e:
                logger.warning(f"could not reach the coordinator at {self.url} ({e}); the certificate runs out at "
                               f"{time.ctime(self.cert.expires_at)}, retrying in {self.poll_every:.0f}s")
            except AccessDenied as e:
                logger.error(f"{e}. The swarm will refuse this peer once its certificate runs out at "
                             f"{time.ctime(self.cert.expires_at)}; stop it and rejoin with a new token")
                if self.revoked:
                    return
            self.publish(dht)

    def close(self) -> None:
        self._stop.set()


@dataclass
class AccessSession:
    """Everything a private-run member holds: identity, state file, client; made by `join_private_run`."""

    client: AccessClient
    identity: PeerIdentity
    workdir: Optional[tempfile.TemporaryDirectory]

    @property
    def dht_kwargs(self) -> dict:
        """What hivemind.DHT needs to run as the certified identity and check everyone else's DHT calls."""
        return dict(identity_path=str(self.identity.path), authorizer=self.client.authorizer())

    def close(self) -> None:
        self.client.close()
        if self.workdir is not None:
            self.workdir.cleanup()


def resolve_token(token: Optional[str]) -> Optional[str]:
    """``--token``, else ``CONVFOREVER_TOKEN``, else None (a public run)."""
    return token or os.environ.get(TOKEN_ENV) or None


def join_private_run(url: Optional[str], token: str, run_id: str, poll_every: float = 30.0) -> AccessSession:
    """Create this process's identity and exchange the token; AccessDenied (with what to do) if that fails."""
    if not url:
        raise AccessDenied("--token needs --coordinator URL: the certificate is issued by the coordinator's HTTP API "
                           "(the URL the run's owner gave you with the token)")
    workdir = tempfile.TemporaryDirectory(prefix="convforever-access-")
    try:
        identity = PeerIdentity.load_or_create(Path(workdir.name) / "identity.key")
        client = AccessClient(url, token, run_id, identity, Path(workdir.name) / "access.json", poll_every=poll_every)
        cert = client.exchange()
    except BaseException:
        workdir.cleanup()
        raise
    logger.info(f"joined private run {run_id} as {cert.peer_id} (certificate until {time.ctime(cert.expires_at)})")
    return AccessSession(client, identity, workdir)


class SelfCertifiedMember:
    """The coordinator's own membership in its private run: it issues its certificate to itself.

    The coordinator's DHT node must pass the same checks as everyone's (peers drop uncertified DHT calls), and its
    state download is refused without a certificate, so it holds one like any peer, signed directly with the run key
    and renewed from its main loop (`tick`), which also republishes the signed revocation list in the DHT.
    """

    def __init__(self, issuer, identity_path: Optional[Path]) -> None:
        from convforever.coordinator.access import Issuer

        assert isinstance(issuer, Issuer)
        self.issuer = issuer
        self.workdir = tempfile.TemporaryDirectory(prefix="convforever-access-")
        self.identity = PeerIdentity.load_or_create(identity_path or Path(self.workdir.name) / "identity.key")
        self.state_path = Path(self.workdir.name) / "access.json"
        self.cert: Optional[Certificate] = None
        self._renew()

    def _renew(self) -> None:
        self.cert = self.issuer.self_issue(self.identity.peer_id, self.identity.public_b64)
        AccessState(self.cert.to_wire(), self.issuer.run_key.public.hex(),
                    self.issuer.revocations().to_wire()).save(self.state_path)

    @property
    def dht_kwargs(self) -> dict:
        authorizer = CertificateAuthorizer(self.identity, self.state_path, self.issuer.run_id, self.issuer.run_key.public)
        return dict(identity_path=str(self.identity.path), authorizer=authorizer)

    def verifier(self) -> CertificateVerifier:
        return CertificateVerifier(self.issuer.run_id, self.issuer.run_key.public)

    def tick(self, dht) -> None:
        """Renew at half-life, refresh the revocation list in the state file, and (re)publish both in the DHT."""
        assert self.cert is not None
        if time.time() >= (self.cert.issued_at + self.cert.expires_at) / 2:
            self._renew()
        else:
            state = AccessState.load(self.state_path)
            revocations = self.issuer.revocations().to_wire()
            if json.loads(revocations)["revoked"]["token_ids"] != json.loads(state.revocations)["revoked"]["token_ids"]:
                state.revocations = revocations
                state.save(self.state_path)
        dht.store(certs_key(self.issuer.run_id), subkey=self.cert.peer_id, value=self.cert.to_wire(),
                  expiration_time=self.cert.expires_at, return_future=True)
        dht.store(revoked_key(self.issuer.run_id), self.issuer.revocations().to_wire(),
                  expiration_time=get_dht_time() + self.issuer.ttl, return_future=True)

    def close(self) -> None:
        self.workdir.cleanup()
