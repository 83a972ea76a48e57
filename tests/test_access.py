"""Access control for private runs: certificates, join tokens, the HTTP exchange and gate, and the averager checks.

The multi-process swarm with an intruder is tests/test_intruder.py.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from convforever.coordinator.access import (
    AccessError,
    Certificate,
    Issuer,
    JoinToken,
    Revocations,
    RunKey,
    TokenStore,
    certificate_request_payload,
    open_issuer,
    rsa_sign,
    sign_certificate,
    verify_certificate,
)
from convforever.coordinator.access_cli import token_main
from convforever.coordinator.access_http import AccessApi, access_middleware
from convforever.coordinator.http import HttpServer, LeaseApi
from convforever.coordinator.leases import LeaseLedger
from convforever.data.shards import DatasetPlan, Shard
from convforever.peer.access import (
    AccessClient,
    AccessDenied,
    CertificateVerifier,
    PeerIdentity,
    join_private_run,
)
from convforever.peer.leases import CoordinatorShards, LeaseRefused, call

RUN = "private-run"


@pytest.fixture()
def issuer(tmp_path) -> Issuer:
    issuer = open_issuer(RUN, tmp_path / "ckpt", ttl=600.0)
    yield issuer
    issuer.tokens.close()


@pytest.fixture()
def identity(tmp_path) -> PeerIdentity:
    return PeerIdentity.load_or_create(tmp_path / "identity.key")


# ---------------------------------------------------------------------------------------------- certificates


def _cert(issuer: Issuer, identity: PeerIdentity, **changes) -> Certificate:
    cert = issuer.self_issue(identity.peer_id, identity.public_b64, token_id="t1")
    return sign_certificate(issuer.run_key, replace(cert, **changes)) if changes else cert


def test_certificate_round_trips_and_verifies(issuer, identity):
    cert = _cert(issuer, identity)
    again = Certificate.from_wire(cert.to_wire())
    assert verify_certificate(again, issuer.run_key.public, RUN) == cert
    assert again.peer_id == identity.peer_id == str(_hivemind_peer_id(identity.path))


def _hivemind_peer_id(path: Path):
    from hivemind.p2p import PeerID

    return PeerID.from_identity(path.read_bytes()).to_base58()


def test_certificate_refused_when_expired_tampered_foreign_or_revoked(issuer, identity, tmp_path):
    cert = _cert(issuer, identity)
    with pytest.raises(AccessError, match="expired"):
        verify_certificate(cert, issuer.run_key.public, RUN, now=cert.expires_at + 1)
    forged = replace(cert, expires_at=cert.expires_at + 10**6)  # signature kept, fields changed
    with pytest.raises(AccessError, match="signature"):
        verify_certificate(Certificate.from_wire(forged.to_wire()), issuer.run_key.public, RUN)
    other_key = RunKey.load_or_create(tmp_path / "other.pem")
    with pytest.raises(AccessError, match="signature"):
        verify_certificate(sign_certificate(other_key, cert), issuer.run_key.public, RUN)
    with pytest.raises(AccessError, match="not 'other'"):
        verify_certificate(cert, issuer.run_key.public, "other")
    with pytest.raises(AccessError, match="revoked") as e:
        verify_certificate(cert, issuer.run_key.public, RUN, revoked=frozenset({"t1"}))
    assert e.value.status == 403
    with pytest.raises(AccessError, match="malformed"):
        Certificate.from_wire("not json")


def test_revocation_list_is_signed(issuer):
    token = issuer.tokens.create("bob")
    issuer.tokens.revoke(token.token_id)
    wire = issuer.revocations().to_wire()
    found = Revocations.from_wire(wire, issuer.run_key.public, RUN)
    assert found is not None and found.token_ids == (token.token_id,)
    tampered = json.loads(wire)
    tampered["revoked"]["token_ids"] = []
    assert Revocations.from_wire(json.dumps(tampered), issuer.run_key.public, RUN) is None
    assert Revocations.from_wire(wire, issuer.run_key.public, "other-run") is None


def test_run_key_persists_with_private_permissions(tmp_path):
    first = RunKey.load_or_create(tmp_path / "k.pem")
    assert RunKey.load_or_create(tmp_path / "k.pem").public == first.public
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------------------------------- tokens


def other_first_char(secret: str) -> str:
    """The secret with its first character changed (a plain "x" + secret[1:] is no change 1 time in 64)."""
    return ("y" if secret[0] == "x" else "x") + secret[1:]


def test_tokens_create_check_revoke_list(issuer):
    token = issuer.tokens.create("alice")
    assert str(token).startswith("cf1.") and token.fingerprint == issuer.run_key.fingerprint
    assert issuer.tokens.check(str(token)) == token.token_id
    with pytest.raises(AccessError, match="unknown join token"):
        issuer.tokens.check(str(replace(token, secret=other_first_char(token.secret))))
    with pytest.raises(AccessError, match="another run"):
        issuer.tokens.check(str(replace(token, fingerprint="0" * 32)))
    with pytest.raises(AccessError, match="not a ConvForever join token"):
        issuer.tokens.check("hunter2")
    assert issuer.tokens.revoke(token.token_id) and not issuer.tokens.revoke(token.token_id)
    with pytest.raises(AccessError, match="revoked") as e:
        issuer.tokens.check(str(token))
    assert e.value.status == 403
    [info] = issuer.tokens.list()
    assert info.name == "alice" and info.revoked is not None
    # only a hash of the secret is stored
    assert token.secret.encode() not in issuer.tokens.path.read_bytes()


def test_token_cli(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    token_main(["create", "--checkpoint-dir", str(ckpt), "--name", "carol"])
    token = JoinToken.parse(capsys.readouterr().out.strip())
    token_main(["list", "--checkpoint-dir", str(ckpt)])
    assert f"{token.token_id}\t" in capsys.readouterr().out
    token_main(["revoke", "--checkpoint-dir", str(ckpt), token.token_id])
    assert "revoked" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="token list"):
        token_main(["revoke", "--checkpoint-dir", str(ckpt), token.token_id])
    store = TokenStore(ckpt / "access.sqlite", token.fingerprint)
    assert store.is_revoked(token.token_id)
    store.close()


def test_issue_needs_the_key_of_the_peer_id(issuer, identity, tmp_path):
    token = str(issuer.tokens.create())
    at = time.time()
    proof = rsa_sign(identity.key, certificate_request_payload(RUN, identity.peer_id, identity.public_b64, at))
    cert = issuer.issue(token, identity.peer_id, identity.public_b64, at, proof)
    assert cert.peer_id == identity.peer_id and cert.key == identity.public_b64
    other = PeerIdentity.load_or_create(tmp_path / "other.key")
    with pytest.raises(AccessError, match="not the key of peer id"):
        issuer.issue(token, other.peer_id, identity.public_b64, at, proof)  # someone else's peer id
    with pytest.raises(AccessError, match="not signed"):
        bad = rsa_sign(other.key, certificate_request_payload(RUN, identity.peer_id, identity.public_b64, at))
        issuer.issue(token, identity.peer_id, identity.public_b64, at, bad)  # a key it does not hold
    with pytest.raises(AccessError, match="clock"):
        issuer.issue(token, identity.peer_id, identity.public_b64, at - 3600, proof)


# ---------------------------------------------------------------------------------------------- HTTP


def _get(url: str, headers: dict | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


@pytest.fixture()
def private_api(tmp_path, issuer):
    from convforever.coordinator.status import StatusBoard
    from convforever.coordinator.web import WebApi

    plan = DatasetPlan("test-data", "/data", [Shard("parquet", f"part-{i}.parquet", 0, 1, 50) for i in range(3)])
    ledger = LeaseLedger(tmp_path / "leases.sqlite", plan, ttl=60)
    routes = LeaseApi(ledger).routes() + AccessApi(issuer).routes() + WebApi(StatusBoard()).routes()
    server = HttpServer(routes, "127.0.0.1", 0, middlewares=(access_middleware(issuer),))
    port = server.start()
    yield f"http://127.0.0.1:{port}", issuer
    server.stop()
    ledger.close()


def test_exchange_then_signed_lease_calls(private_api, tmp_path):
    url, issuer = private_api
    session = join_private_run(url, str(issuer.tokens.create("dave")), RUN)
    try:
        client = session.client
        assert client.cert is not None and client.cert.peer_id == session.identity.peer_id
        source = CoordinatorShards(url, client.cert.peer_id, auth=client.signer())
        lease = source.acquire(0, 1)
        assert lease.lease_id  # a real lease, not a re-read
        assert source.renew(lease, 10)
        source.complete(lease, 50, {})
        assert not source._undelivered
        # The same certificate, a body naming another peer: refused (a peer acts only for itself).
        with pytest.raises(LeaseRefused, match="only act for itself"):
            call(f"{url}/api/v1/leases", {"peer_id": "someone-else"}, auth=client.signer())
    finally:
        session.close()


def test_lease_calls_without_a_certificate_say_what_to_do(private_api, tmp_path, identity):
    url, issuer = private_api
    with pytest.raises(LeaseRefused, match="HTTP 401.*--token"):
        call(f"{url}/api/v1/leases", {"peer_id": identity.peer_id})
    # A certificate copied from the DHT is public: without its key the request is refused.
    cert = issuer.self_issue(identity.peer_id, identity.public_b64, "t")
    thief = PeerIdentity.load_or_create(tmp_path / "thief.key")
    from convforever.coordinator.access import request_headers

    body = json.dumps({"peer_id": identity.peer_id}).encode()
    headers = request_headers(thief.key, cert.to_wire(), "POST", "/api/v1/leases", body)
    request = urllib.request.Request(f"{url}/api/v1/leases", data=body, method="POST",
                                     headers={**headers, "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 401 and "not signed by the certificate's key" in json.loads(e.value.read())["error"]


def test_bad_revoked_and_unreachable_tokens_fail_with_one_clear_line(private_api, tmp_path):
    url, issuer = private_api
    token = issuer.tokens.create()
    with pytest.raises(AccessDenied, match="unknown join token"):
        join_private_run(url, str(replace(token, secret="nope")), RUN)
    with pytest.raises(AccessDenied, match="not a ConvForever join token"):
        join_private_run(url, "garbage", RUN)
    issuer.tokens.revoke(token.token_id)
    with pytest.raises(AccessDenied, match="revoked; ask the run's owner"):
        join_private_run(url, str(token), RUN)
    with pytest.raises(AccessDenied, match="could not reach the coordinator.*--coordinator"):
        join_private_run("http://127.0.0.1:9", str(issuer.tokens.create()), RUN)
    with pytest.raises(AccessDenied, match="needs --coordinator"):
        join_private_run(None, str(issuer.tokens.create()), RUN)
    # A token pins the run key: a coordinator that accepts the token but signs with another key (a wrong or
    # hostile URL) is not believed.
    impostor = Issuer(RUN, RunKey.load_or_create(tmp_path / "impostor.pem"),
                      TokenStore(tmp_path / "impostor.sqlite", issuer.run_key.fingerprint))
    server = HttpServer(AccessApi(impostor).routes(), "127.0.0.1", 0)
    port = server.start()
    try:
        with pytest.raises(AccessDenied, match="not the one your token names"):
            join_private_run(f"http://127.0.0.1:{port}", str(impostor.tokens.create()), RUN)
    finally:
        server.stop()
        impostor.tokens.close()


def test_renewal_after_revocation_is_refused(private_api, tmp_path):
    url, issuer = private_api
    token = issuer.tokens.create()
    identity = PeerIdentity.load_or_create(tmp_path / "p.key")
    client = AccessClient(url, str(token), RUN, identity, tmp_path / "state.json")
    client.exchange()
    issuer.tokens.revoke(token.token_id)
    with pytest.raises(AccessDenied, match="revoked"):
        client.exchange()
    assert client.revoked
    # ... and a certificate issued before the revocation no longer opens the lease API.
    with pytest.raises(LeaseRefused, match="HTTP 403"):
        call(f"{url}/api/v1/leases", {"peer_id": identity.peer_id}, auth=client.signer())


def test_status_page_is_token_gated_unless_public(private_api, tmp_path):
    url, issuer = private_api
    status, body, _ = _get(f"{url}/api/status")
    assert status == 401 and "?token=" in json.loads(body)["error"]
    assert _get(f"{url}/healthz")[0] == 200
    token = str(issuer.tokens.create())
    status, _, headers = _get(f"{url}/?token={token}")
    assert status == 200 and "convforever_token=" in headers.get("Set-Cookie", "")
    # the board is empty (no tick yet): 503, past the gate
    assert _get(f"{url}/api/status", {"Authorization": f"Bearer {token}"})[0] == 503
    assert _get(f"{url}/api/status", {"Cookie": f"convforever_token={token}"})[0] == 503
    assert _get(f"{url}/api/status", {"Authorization": "Bearer cf1.a.b.c"})[0] == 401
    server = HttpServer(AccessApi(issuer).routes(), "127.0.0.1", 0,
                        middlewares=(access_middleware(issuer, public_status=True),))
    port = server.start()
    try:
        assert _get(f"http://127.0.0.1:{port}/api/v1/revocations")[0] == 200
        status, body, _ = _get(f"http://127.0.0.1:{port}/api/v1/leases")
        assert status == 401  # lease calls need a certificate even with a public page
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- verifier


def test_verifier_admits_only_live_unrevoked_certificates(issuer, identity):
    verifier = CertificateVerifier(RUN, issuer.run_key.public)
    assert verifier.reason(identity.peer_id) == "no certificate of this run"
    token = issuer.tokens.create()
    cert = issuer.self_issue(identity.peer_id, identity.public_b64, token.token_id)
    verifier.learn(cert.to_wire())
    assert verifier.reason(identity.peer_id) is None
    verifier.learn("forged")
    verifier.learn(replace(cert, peer_id="12D3KooWintruder").to_wire())  # signature no longer matches
    assert verifier.reason("12D3KooWintruder") is not None
    issuer.tokens.revoke(token.token_id)
    verifier.learn_revocations(issuer.revocations().to_wire())
    assert "revoked" in verifier.reason(identity.peer_id)


# ---------------------------------------------------------------------------------------------- averager checks


class _Awaitable:
    def __init__(self, value) -> None:
        self.value = value

    def __await__(self):
        yield from []
        return self.value


class _FakeDHT:
    """Just enough of hivemind.DHT for the mixin: keyed reads, sync or as an awaitable future."""

    def __init__(self, values: dict) -> None:
        self.values = values

    def get(self, key, latest=True, return_future=False):
        value = self.values.get(key)
        return _Awaitable(value) if return_future else value


class _FakeAverager:
    """Stands in for hivemind's DecentralizedAverager below the mixin: records what reached it."""

    def __init__(self, dht) -> None:
        from types import SimpleNamespace

        self.dht = dht
        self._matchmaking = SimpleNamespace(group_key_manager=SimpleNamespace(prefix="run_state_averager"))
        self.reached = []

    async def _aggregate_with_group(self, group_info, min_vector_size, **kwargs):
        self.reached.append("allreduce")
        return {}

    async def _load_state_from_peers(self, future, timeout=None):
        donors, _ = self.dht.get("run_state_averager.all_averagers", latest=True) or ({}, None)
        self.reached.append(sorted(donors))


def test_mixin_refuses_groups_and_donors_without_certificates(issuer, tmp_path):
    import asyncio

    from hivemind.averaging.group_info import GroupInfo
    from hivemind.averaging.partition import AllreduceException
    from hivemind.p2p import PeerID
    from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

    from convforever.peer.access import AuthorizedAveragerMixin, certs_key

    honest = PeerIdentity.load_or_create(tmp_path / "honest.key")
    intruder = PeerIdentity.load_or_create(tmp_path / "intruder.key")
    cert = issuer.self_issue(honest.peer_id, honest.public_b64, "t")
    exp = get_dht_time() + 60
    ids = {name: PeerID.from_base58(ident.peer_id) for name, ident in (("honest", honest), ("intruder", intruder))}
    dht = _FakeDHT({
        certs_key(RUN): ValueWithExpiration({honest.peer_id: ValueWithExpiration(cert.to_wire(), exp)}, exp),
        "run_state_averager.all_averagers": ValueWithExpiration(
            {ids["honest"].to_bytes(): ValueWithExpiration(1.0, exp),
             ids["intruder"].to_bytes(): ValueWithExpiration(9.0, exp)}, exp),
    })

    class Checked(AuthorizedAveragerMixin, _FakeAverager):
        pass

    averager = Checked(dht, access=CertificateVerifier(RUN, issuer.run_key.public))
    asyncio.run(averager._aggregate_with_group(GroupInfo(b"g", (ids["honest"],), ()), 1))
    with pytest.raises(AllreduceException, match="not certified"):
        asyncio.run(averager._aggregate_with_group(GroupInfo(b"g", (ids["honest"], ids["intruder"]), ()), 1))
    asyncio.run(averager._load_state_from_peers(None))
    assert averager.reached == ["allreduce", [ids["honest"].to_bytes()]]  # the intruder is no donor
    assert averager.dht is dht  # the filtered view is gone after the download

    public = Checked(dht)  # access=None: a public run checks nothing
    asyncio.run(public._aggregate_with_group(GroupInfo(b"g", (ids["honest"], ids["intruder"]), ()), 1))
    assert public.reached == ["allreduce"]


def _member(issuer: Issuer, tmp_path: Path, name: str):
    """A certified identity with its state file and DHT arguments, as `join_private_run` would leave them."""
    from convforever.peer.access import AccessState, CertificateAuthorizer

    identity = PeerIdentity.load_or_create(tmp_path / f"{name}.key")
    cert = issuer.self_issue(identity.peer_id, identity.public_b64, issuer.tokens.create(name).token_id)
    state = tmp_path / f"{name}.json"
    AccessState(cert.to_wire(), issuer.run_key.public.hex(), issuer.revocations().to_wire()).save(state)
    authorizer = CertificateAuthorizer(identity, state, RUN, issuer.run_key.public)
    return cert, dict(identity_path=str(identity.path), authorizer=authorizer)


@pytest.mark.slow
def test_dht_and_averagers_admit_members_and_refuse_an_outsider(issuer, tmp_path):
    import asyncio

    import hivemind
    import torch
    from hivemind.averaging import DecentralizedAverager
    from hivemind.proto import averaging_pb2
    from hivemind.utils.multiaddr import Multiaddr
    from hivemind.utils.timed_storage import get_dht_time

    from convforever.peer.access import authorized, certs_key

    cert_a, kwargs_a = _member(issuer, tmp_path, "a")
    cert_b, kwargs_b = _member(issuer, tmp_path, "b")
    loopback = ["/ip4/127.0.0.1/tcp/0"]
    dhts, averagers = [], []
    try:
        dhts.append(hivemind.DHT(start=True, host_maddrs=loopback, **kwargs_a))
        maddrs = [str(m) for m in dhts[0].get_visible_maddrs()]
        dhts.append(hivemind.DHT(start=True, initial_peers=maddrs, host_maddrs=loopback, **kwargs_b))
        for dht, cert in zip(dhts, (cert_a, cert_b), strict=True):
            assert str(dht.peer_id) == cert.peer_id
            dht.store(certs_key(RUN), subkey=cert.peer_id, value=cert.to_wire(), expiration_time=cert.expires_at)
        # an outsider's DHT cannot bootstrap from a member: every request it makes is dropped
        with pytest.raises(RuntimeError, match="bootstrap failed"):
            hivemind.DHT(start=True, initial_peers=maddrs, host_maddrs=loopback).shutdown()

        checked = authorized(DecentralizedAverager)
        assert checked.__name__ == "DecentralizedAverager"  # same RPC protocol names as the plain class
        for dht, value in zip(dhts, (0.0, 1.0), strict=True):
            averagers.append(checked(averaged_tensors=[torch.full((4,), value)], dht=dht, prefix="mix",
                                     target_group_size=2, min_matchmaking_time=2.0, request_timeout=1.0, start=True,
                                     access=CertificateVerifier(RUN, issuer.run_key.public)))
        futures = [a.step(wait=False) for a in averagers]
        assert [len(f.result(timeout=90)) for f in futures] == [2, 2]
        with averagers[0].get_tensors() as tensors:
            assert torch.allclose(tensors[0], torch.full((4,), 0.5))

        outsider = hivemind.DHT(start=True, host_maddrs=loopback)
        dhts.append(outsider)

        async def attack() -> dict[str, str]:
            p2p = await outsider.replicate_p2p()
            await p2p._client.connect(dhts[0].peer_id, [Multiaddr(m.split("/p2p/")[0]) for m in maddrs])
            stub = DecentralizedAverager.get_stub(p2p, dhts[0].peer_id, namespace="mix")
            seen = {}
            for name, call_ in (
                ("download", lambda: stub.rpc_download_state(averaging_pb2.DownloadRequest())),
                ("join", lambda: stub.rpc_join_group(averaging_pb2.JoinRequest(
                    schema_hash=b"x", expiration=get_dht_time() + 5, group_key="mix.0b"))),
            ):
                try:
                    seen[name] = repr([m async for m in await call_()])
                except Exception as e:  # P2PHandlerError carrying the server's refusal
                    seen[name] = str(e)
            return seen

        seen = asyncio.run(attack())
        assert "may not download the state in private run" in seen["download"]
        assert "may not join an averaging group in private run" in seen["join"]
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()
