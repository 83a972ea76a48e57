"""The paced leader search (compression/matchmaking.py): group-key reads spaced by the poll interval, and every
averager of ours gets it before its first round (real averagers on a loopback DHT)."""

from __future__ import annotations

import asyncio
import time

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.matchmaking import PotentialLeaders
from hivemind.utils.mpfuture import MPFuture

from convforever.compression.guard import GuardedAveragerMixin
from convforever.compression.matchmaking import PacedPotentialLeaders, PacedReads, pace_leader_search


class KeyManager:
    current_key = "run_grad_averager.0b"

    def __init__(self) -> None:
        self.reads: list[float] = []

    async def get_averagers(self, group_key: str, only_active: bool) -> list:
        self.reads.append(time.monotonic())
        return []


def test_reads_of_the_group_key_are_spaced_by_the_interval():
    keys = KeyManager()
    paced = PacedReads(keys, interval=0.2)

    async def poll(times: int) -> None:
        for _ in range(times):
            assert await paced.get_averagers(paced.current_key, only_active=True) == []

    asyncio.run(poll(4))
    gaps = [later - earlier for earlier, later in zip(keys.reads, keys.reads[1:], strict=False)]
    assert len(keys.reads) == 4 and min(gaps) >= 0.19, gaps  # timestamps taken a little after each release


class Matchmaking:
    def __init__(self, min_matchmaking_time: float) -> None:
        self.potential_leaders = PotentialLeaders("peer", min_matchmaking_time, target_group_size=4)


def test_the_interval_is_at_most_a_quarter_of_the_matchmaking_time_and_pacing_is_done_once():
    slow, quick = Matchmaking(5.0), Matchmaking(1.0)
    for made in (slow, quick):
        pace_leader_search(made)
    assert isinstance(slow.potential_leaders, PacedPotentialLeaders)
    assert slow.potential_leaders.poll_interval == 0.5 and quick.potential_leaders.poll_interval == 0.25
    assert (slow.potential_leaders.peer_id, slow.potential_leaders.target_group_size) == ("peer", 4)
    paced = slow.potential_leaders
    pace_leader_search(slow)
    assert slow.potential_leaders is paced


def test_averagers_form_a_group_with_the_paced_search():
    """Two averagers on our base (every averager of ours has it) average once; each one's matchmaking then holds the
    paced search."""
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(start=True, initial_peers=[str(m) for m in first.get_visible_maddrs()],
                          host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    made = []
    try:
        for dht, value in ((first, 1.0), (second, 3.0)):
            made.append(Averager([torch.full((8,), value)], dht=dht, prefix="paced_test", target_group_size=2,
                                 min_matchmaking_time=2.0, request_timeout=1.0, start=True))
        controls = [one.step(wait=False, timeout=30) for one in made]
        assert all(control.result(timeout=60) for control in controls)  # each: the group it averaged with
        for one in made:
            with one.get_tensors() as tensors:
                assert torch.equal(tensors[0], torch.full((8,), 2.0))
        assert all(one.paced() for one in made)
    finally:
        for one in made:
            one.shutdown()
        first.shutdown()
        second.shutdown()


class Averager(GuardedAveragerMixin, DecentralizedAverager):
    """Ours, able to say from its averager process whether its matchmaking holds the paced search."""

    _rpc_handlers = None
    _stub_type = None

    def paced(self) -> bool:
        future = MPFuture()
        self._outer_pipe.send(("_paced", [], dict(future=future)))
        return future.result(timeout=10)

    async def _paced(self, future: MPFuture) -> None:
        future.set_result(isinstance(self._matchmaking.potential_leaders, PacedPotentialLeaders))
