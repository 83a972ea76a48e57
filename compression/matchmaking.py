"""Matchmaking that reads the DHT at a bounded rate.

hivemind 1.1.12's ``PotentialLeaders`` re-reads the group key (``DHT.get(latest=True)``: a lookup that asks several
DHT nodes) each time ``pop_next_leader`` finds its queue of candidate leaders dry, and while a peer waits for its
groupmates the queue is dry most of the time: it polls as fast as a lookup returns. Measured with a probe in
bench/home_links.py (bench/RESULTS.md, "Where the rest of the Optimizer path's DHT traffic comes from"): 826 such
reads in ~20 s from 4 peers, about 10 a second per peer and ~60% of all their DHT calls, each one or more RPCs of
1-3 KB. On a home link that is bandwidth the gradients do not get.

``PacedPotentialLeaders`` lets at most one read through per ``poll_interval`` (the first of each search at once). A
new leader is then seen up to ``poll_interval`` later; the interval is at most a quarter of the matchmaking time, so
a follower still has most of the window to join it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.matchmaking import Matchmaking, PotentialLeaders

POLL_INTERVAL = 0.5  # seconds between two reads of the group key in one search (at most)


class PacedPotentialLeaders(PotentialLeaders):
    """hivemind's leader search with its group-key reads spaced by ``poll_interval`` seconds."""

    def __init__(self, *args: Any, poll_interval: float = POLL_INTERVAL, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.poll_interval = poll_interval

    async def _update_queue_periodically(self, key_manager: GroupKeyManager) -> None:
        await super()._update_queue_periodically(PacedReads(key_manager, self.poll_interval))


class PacedReads:
    """A ``GroupKeyManager`` whose ``get_averagers`` waits until ``interval`` seconds have passed since its last call."""

    def __init__(self, key_manager: GroupKeyManager, interval: float) -> None:
        self._key_manager, self._interval, self._last = key_manager, interval, -float("inf")

    async def get_averagers(self, group_key: str, only_active: bool) -> Any:
        wait = self._last + self._interval - time.monotonic()
        if wait > 0:
            current = group_key == self._key_manager.current_key
            await asyncio.sleep(wait)
            if current:  # hivemind asks for the current key: read the one current after the wait
                group_key = self._key_manager.current_key
        self._last = time.monotonic()
        return await self._key_manager.get_averagers(group_key, only_active)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._key_manager, name)


def pace_leader_search(matchmaking: Matchmaking) -> None:
    """Give ``matchmaking`` a paced leader search; call before its first search (a no-op once done)."""
    leaders = matchmaking.potential_leaders
    if isinstance(leaders, PacedPotentialLeaders):
        return
    interval = min(POLL_INTERVAL, leaders.min_matchmaking_time / 4)
    matchmaking.potential_leaders = PacedPotentialLeaders(leaders.peer_id, leaders.min_matchmaking_time,
                                                          leaders.target_group_size, poll_interval=interval)
