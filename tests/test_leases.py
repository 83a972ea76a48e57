"""The data plan and lease ledger (coordinator/leases.py), its HTTP API, and the peer's lease client.

The ledger tests drive a real SQLite file with a controllable clock; the API tests go through a real
aiohttp server on 127.0.0.1 with the peer's own client. Multi-process runs (peers killed mid-shard, the
coordinator restarted) are in test_swarm_data.py.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from convforever.coordinator.http import HttpServer, LeaseApi
from convforever.coordinator.leases import LeaseError, LeaseLedger
from convforever.data import write_demo_dataset
from convforever.data.loader import DataConfig, Lease, make_loader
from convforever.data.shards import DatasetPlan, Shard, plan_dataset
from convforever.peer.leases import CoordinatorShards


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _plan(n: int = 6, rows: int = 100) -> DatasetPlan:
    return DatasetPlan("test-data", "/data", [Shard("parquet", f"part-{i}.parquet", 0, 1, rows) for i in range(n)])


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_each_shard_once_per_pass_and_passes_counted(tmp_path, clock):
    ledger = LeaseLedger(tmp_path / "l.sqlite", _plan(6), ttl=60, clock=clock)
    seen: list[tuple[int, str]] = []
    for i in range(18):  # three passes, two peers taking turns
        peer = "A" if i % 2 else "B"
        grant = ledger.grant(peer)
        assert grant is not None
        seen.append((grant.data_pass, grant.shard["path"]))
        ledger.complete(grant.lease_id, peer, used=90, skipped={"no_label": 10})
        clock.now += 1
    by_pass = Counter(p for p, _ in seen)
    assert by_pass == {0: 6, 1: 6, 2: 6}
    assert all(len({path for p, path in seen if p == k}) == 6 for k in range(3))  # every shard once per pass
    assert [path for p, path in seen if p == 0] != [path for p, path in seen if p == 1]  # each pass its own order
    summary = ledger.summary()
    assert summary["passes_completed"] == 3 and summary["rows_used"] == 18 * 90
    assert summary["skipped"] == {"no_label": 180} and summary["peers"]["A"]["shards"] == 9


def test_next_pass_opens_while_stragglers_finish(tmp_path, clock):
    ledger = LeaseLedger(tmp_path / "l.sqlite", _plan(2), ttl=60, clock=clock)
    slow = ledger.grant("slow")
    fast = ledger.grant("fast")
    ledger.complete(fast.lease_id, "fast", 100, {})
    nxt = ledger.grant("fast")  # pass 0's last shard is held: the next pass opens instead of waiting
    assert (slow.data_pass, nxt.data_pass) == (0, 1)
    ledger.complete(nxt.lease_id, "fast", 100, {})
    other = ledger.grant("fast")
    assert other.data_pass == 1 and other.shard != nxt.shard
    assert ledger.grant("fast") is None  # passes 0 and 1 fully held or done; no running two passes ahead
    ledger.complete(slow.lease_id, "slow", 100, {})
    assert ledger.current_pass() == 1


def test_expired_lease_goes_back_and_resumes_at_reported_row(tmp_path, clock):
    ledger = LeaseLedger(tmp_path / "l.sqlite", _plan(2), ttl=60, clock=clock)
    first = ledger.grant("A")
    ledger.renew(first.lease_id, "A", rows_done=40)
    other = ledger.grant("B")
    ledger.complete(other.lease_id, "B", 100, {})
    clock.now += 30
    ahead = ledger.grant("B")  # A's lease is alive: B moves on to the next pass
    assert ahead.data_pass == 1
    ledger.complete(ahead.lease_id, "B", 100, {})
    clock.now += 31
    second = ledger.grant("B")
    assert second.shard == first.shard and second.start_row == 40 and second.data_pass == 0
    for call in (lambda: ledger.renew(first.lease_id, "A", 50), lambda: ledger.complete(first.lease_id, "A", 1, {})):
        with pytest.raises(LeaseError) as refused:
            call()
        assert refused.value.status == 410
    with pytest.raises(LeaseError) as wrong_peer:
        ledger.complete(second.lease_id, "A", 1, {})
    assert wrong_peer.value.status == 403
    ledger.complete(second.lease_id, "B", 55, {"corrupt_image": 5})
    shard_id = int(first.shard["path"][5])
    assert (shard_id, 0, "B", 55, {"corrupt_image": 5}) in ledger.completions()


def test_late_renewal_of_an_untaken_lease_is_accepted(tmp_path, clock):
    ledger = LeaseLedger(tmp_path / "l.sqlite", _plan(1), ttl=60, clock=clock)
    grant = ledger.grant("A")
    clock.now += 500  # nobody asked for the shard meanwhile: the slow peer keeps it
    ledger.renew(grant.lease_id, "A", 10)
    ledger.complete(grant.lease_id, "A", 100, {})
    assert ledger.current_pass() == 1


def test_released_shard_resumes_for_the_next_peer(tmp_path, clock):
    ledger = LeaseLedger(tmp_path / "l.sqlite", _plan(1), ttl=60, clock=clock)
    grant = ledger.grant("A")
    ledger.release(grant.lease_id, "A", rows_done=70)
    again = ledger.grant("B")
    assert again.shard == grant.shard and again.start_row == 70


def test_restart_keeps_plan_leases_and_completions(tmp_path, clock):
    path = tmp_path / "l.sqlite"
    ledger = LeaseLedger(path, _plan(3), ttl=60, clock=clock)
    done = ledger.grant("A")
    ledger.complete(done.lease_id, "A", 100, {})
    held = ledger.grant("A")
    ledger.renew(held.lease_id, "A", 25)
    ledger.close()
    clock.now += 600  # down for longer than the ttl: peers could not renew meanwhile

    assert LeaseLedger.exists(path)
    again = LeaseLedger(path, ttl=60, clock=clock)  # no plan given: the stored one is used
    assert [s.key for s in again.shards] == [s.key for s in _plan(3).shards]
    again.renew(held.lease_id, "A", 30)  # the live lease survived the restart
    last = again.grant("B")
    assert last.shard not in (done.shard, held.shard) and last.data_pass == 0
    assert again.grant("B").data_pass == 1  # pass 0 is all done or held
    with pytest.raises(ValueError, match="holds the plan of dataset 'test-data'"):
        LeaseLedger(path, DatasetPlan("other", "/x", _plan(1).shards), ttl=60)


def test_ledger_needs_a_plan_the_first_time(tmp_path):
    with pytest.raises(ValueError, match="pass --dataset"):
        LeaseLedger(tmp_path / "l.sqlite", None)


# -------------------------------------------------------------------------------------------- HTTP API


def _post(url: str, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def api(tmp_path):
    ledger = LeaseLedger(tmp_path / "l.sqlite", _plan(2), ttl=60)
    server = HttpServer(LeaseApi(ledger).routes(), "127.0.0.1", 0)
    port = server.start()
    yield f"http://127.0.0.1:{port}", ledger
    server.stop()


def test_api_lease_cycle_and_refusals(api):
    url, _ = api
    status, answer = _post(f"{url}/api/v1/leases", {"peer_id": "A"})
    assert status == 200 and answer["lease"]["shard"]["format"] == "parquet" and answer["lease"]["root"] == "/data"
    lease_id = answer["lease"]["lease_id"]
    assert _post(f"{url}/api/v1/leases/{lease_id}/renew", {"peer_id": "A", "rows_done": 10}) == (200, {"ttl": 60.0})
    assert _post(f"{url}/api/v1/leases/{lease_id}/complete", {"peer_id": "A", "used": 9, "skipped": {"x": 1}})[0] == 200
    status, answer = _post(f"{url}/api/v1/leases/{lease_id}/complete", {"peer_id": "A", "used": 9})
    assert status == 410 and "ask for a new one" in answer["error"]
    assert _post(f"{url}/api/v1/leases/nope/renew", {"peer_id": "A"})[0] == 404
    for bad, field in [({}, "peer_id"), ({"peer_id": 3}, "peer_id"), ([1], "JSON object"),
                       ({"peer_id": "A", "used": -1}, "'used'"), ({"peer_id": "A", "used": True}, "'used'"),
                       ({"peer_id": "A", "used": 1, "skipped": {"r": "many"}}, "'skipped'")]:
        path = "/api/v1/leases" if field == "peer_id" or field == "JSON object" else f"/api/v1/leases/{lease_id}/complete"
        status, answer = _post(url + path, bad)
        assert status == 400 and field in answer["error"], (bad, answer)
    with urllib.request.urlopen(f"{url}/api/v1/data", timeout=10) as response:
        summary = json.loads(response.read())
    assert summary["shards"] == 2 and summary["peers"]["A"]["rows_used"] == 9


def test_api_without_dataset_says_peers_bring_data():
    server = HttpServer(LeaseApi(None).routes(), "127.0.0.1", 0)
    port = server.start()
    try:
        status, answer = _post(f"http://127.0.0.1:{port}/api/v1/leases", {"peer_id": "A"})
        assert status == 404 and "--data" in answer["error"]
    finally:
        server.stop()


def test_busy_port_error_names_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="--http-port"):
            HttpServer([], "127.0.0.1", taken.getsockname()[1]).start()


# ------------------------------------------------------------------------------ the peer's lease client


def test_loader_on_leases_reports_every_row(tmp_path):
    demo = write_demo_dataset(tmp_path / "demo", train_rows=300, eval_rows=10, image_size=32, num_shards=2)
    plan = plan_dataset(str(Path(demo.train_files[0]).parent), shard_rows=100)
    ledger = LeaseLedger(tmp_path / "l.sqlite", plan, ttl=60)
    server = HttpServer(LeaseApi(ledger).routes(), "127.0.0.1", 0)
    port = server.start()
    try:
        source = CoordinatorShards(f"http://127.0.0.1:{port}", "peer-A")
        samples = 0
        for batch in make_loader(DataConfig(image_size=16, batch_size=16, shuffle_buffer=32), source):
            samples += len(batch.labels)
            if batch.passes >= 1:
                break
        completions = [c for c in ledger.completions() if c[1] == 0]
        assert sorted(c[0] for c in completions) == list(range(len(plan.shards)))
        for shard_id, _, peer, used, skipped in completions:  # every row of every shard accounted for once
            assert peer == "peer-A" and used + sum(skipped.values()) == plan.shards[shard_id].num_rows
        assert samples >= sum(c[3] for c in completions)
    finally:
        server.stop()


def test_client_keeps_training_while_the_coordinator_is_down(tmp_path):
    """No coordinator: the last shard is re-read; completions wait and are delivered once it is back."""
    ledger = LeaseLedger(tmp_path / "l.sqlite", _plan(2), ttl=60)
    server = HttpServer(LeaseApi(ledger).routes(), "127.0.0.1", 0)
    port = server.start()
    source = CoordinatorShards(f"http://127.0.0.1:{port}", "A", backoff=0.05, timeout=2)
    lease = source.acquire(0, 1)
    server.stop()
    source.complete(lease, 90, {"no_label": 10})  # undeliverable for now
    replay = source.acquire(0, 1)
    assert replay.shard == lease.shard and replay.lease_id == "" and source.renew(replay, 10)
    assert ledger.completions() == []

    server = HttpServer(LeaseApi(ledger).routes(), "127.0.0.1", port)
    server.start()
    try:
        source._retry_at = 0.0  # do not wait out the backoff in a test
        fresh = source.acquire(0, 1)
        assert isinstance(fresh, Lease) and fresh.lease_id and fresh.shard != lease.shard
        assert ledger.completions() == [(int(lease.shard.path[5]), 0, "A", 90, {"no_label": 10})]
    finally:
        server.stop()
