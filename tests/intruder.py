"""An intruder for tests/test_intruder.py: a process that knows a private run's addresses but holds no certificate.

It runs our own code (an attacker can), so it speaks the peers' exact protocols, and it tries, in order:
  token     exchange its join token (a revoked one, or none) for a certificate;
  lease     POST /api/v1/leases and GET /api/status without a certificate;
  dht       join the swarm's DHT through the coordinator's multiaddrs;
  join      join an averaging group of an honest peer (state averager and gradient averager handlers);
  aggregate send a tensor part for averaging to that peer;
  download  download that peer's state.
It writes what it observed (the refusals' text, or what it got) as JSON to --out.

    python tests/intruder.py --run-id R --coordinator URL --initial-peers MADDR... --target MADDR/p2p/ID --out F
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import urllib.error
import urllib.request
from pathlib import Path

import hivemind
from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.timed_storage import get_dht_time

import convforever.compression.factory as factory
from convforever.compression.guard import GuardedTrainingStateAverager


def http(url: str, body: dict | None = None) -> str:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return f"HTTP {response.status} {response.read()[:300].decode(errors='replace')}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.read()[:300].decode(errors='replace')}"


def try_token(args) -> str:
    from convforever.peer.access import AccessDenied, join_private_run

    if not args.token:
        return "no token"
    try:
        session = join_private_run(args.coordinator, args.token, args.run_id)
    except AccessDenied as e:
        return f"refused: {e}"
    session.close()
    return "GRANTED a certificate"


def try_dht(args) -> str:
    try:
        dht = hivemind.DHT(start=True, initial_peers=args.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    except Exception as e:
        return f"refused: {e}"
    found = dht.get(f"{args.run_id}_certs", latest=True)
    dht.shutdown()
    return f"JOINED the DHT (read {found!r:.200})"


def grad_averager_classes() -> list[type]:
    """Every gradient averager class the peers may serve (whatever --compression they chose)."""
    return [cls for _, cls in inspect.getmembers(factory, inspect.isclass)
            if issubclass(cls, DecentralizedAverager) and cls.__module__.startswith("convforever")]


async def attack_peer(args, dht: hivemind.DHT) -> dict:
    p2p = await dht.replicate_p2p()
    address, _, target = args.target.rpartition("/p2p/")
    target_id = PeerID.from_base58(target)
    await p2p._client.connect(target_id, [Multiaddr(address)])
    seen: dict = {"join": [], "aggregate": [], "download": [], "peer_id": p2p.peer_id.to_base58()}

    async def outcome(name: str, call) -> None:
        try:
            messages = [m async for m in await call]
            seen[name].append(f"ANSWERED {len(messages)} messages: {[str(m)[:80] for m in messages[:3]]}")
        except Exception as e:  # P2PHandlerError: the peer's handler refused (or does not exist under that name)
            seen[name].append(f"refused: {e}")

    join = averaging_pb2.JoinRequest(schema_hash=b"\0" * 32, expiration=get_dht_time() + 10,
                                     group_key=f"{args.run_id}_grad_averager.0b")
    for cls, prefix in ([(GuardedTrainingStateAverager, f"{args.run_id}_state_averager")] +
                        [(cls, f"{args.run_id}_grad_averager") for cls in grad_averager_classes()]):
        stub = cls.get_stub(p2p, target_id, namespace=prefix)
        await outcome("join", stub.rpc_join_group(join))
        part = averaging_pb2.AveragingData(group_id=b"x" * 20, peer_id=p2p.peer_id.to_bytes(), weight=1.0)
        await outcome("aggregate", stub.rpc_aggregate_part(_one(part)))
    stub = GuardedTrainingStateAverager.get_stub(p2p, target_id, namespace=f"{args.run_id}_state_averager")
    await outcome("download", stub.rpc_download_state(averaging_pb2.DownloadRequest()))
    return seen


async def _one(message):
    yield message


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-id", required=True)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--initial-peers", nargs="+", required=True)
    p.add_argument("--target", required=True, help="an honest peer's multiaddr with /p2p/ID")
    p.add_argument("--token", default="")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    seen: dict = {"token": try_token(args)}
    seen["lease"] = http(f"{args.coordinator}/api/v1/leases", {"peer_id": "12D3KooWintruder"})
    seen["status"] = http(f"{args.coordinator}/api/status")
    seen["dht"] = try_dht(args)
    own = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])  # a DHT of its own, to dial the peer directly
    try:
        seen.update(asyncio.run(attack_peer(args, own)))
    finally:
        own.shutdown()
    args.out.write_text(json.dumps(seen, indent=1))


if __name__ == "__main__":
    main()
