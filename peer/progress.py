"""The peer's view of the swarm's progress: hivemind's tracker, deaf to implausible epoch claims, publishing its own
progress at a bounded rate.

hivemind's ``ProgressTracker`` takes the largest epoch any peer claims as the global one. A peer that claims a
far-future epoch (a bug, a clock gone wrong, malice) would then put every honest peer out of sync: each would try
to download that epoch's state, fail or load a stale one, and try again instead of training (and, while out of
sync, publish no progress of its own that could outvote the claim).

hivemind also stores a progress record after every local step: ~3 DHT stores a second per peer at 315 ms of compute
per step (bench/home_links.py), about a third of the Optimizer path's DHT calls. Others extrapolate our samples
between records from the ``samples_per_second`` each record carries, so one record a second within an epoch tells
them as much; a record for a new epoch, and the first with samples in it, still go out at once (``_report_now``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping, Optional

from hivemind.optim.progress_tracker import GlobalTrainingProgress, ProgressTracker

from convforever.coordinator.protocol import plausible_epoch_limit

logger = logging.getLogger(__name__)

REPORT_INTERVAL = 1.0  # seconds between two progress records of one epoch (at most)


class PacedEvent(threading.Event):
    """hivemind's "report progress now" event, whose ``wait`` returns at most once per ``interval`` seconds unless
    ``urgent()`` says otherwise.

    The tracker's reporter thread waits on it and stores a record each time it returns set; holding the return back
    makes the record it then stores carry the newest progress instead of one per step. Every ``set`` (a report)
    wakes the hold to ask ``urgent()`` again, so an urgent record waits for nothing, and ``released()`` runs each
    time the wait lets the reporter through.
    """

    def __init__(self, interval: float, urgent: Callable[[], bool], released: Callable[[], None]) -> None:
        super().__init__()
        self.interval, self._urgent, self._released = interval, urgent, released
        self._last = -float("inf")
        self._kick = threading.Event()  # set with the event, cleared by the hold: "a report came in, look again"

    def set(self) -> None:
        super().set()
        self._kick.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        fired = super().wait(timeout)
        if fired:
            while not self._urgent():
                delay = self._last + self.interval - time.monotonic()
                if delay <= 0:
                    break
                self._kick.clear()
                self._kick.wait(delay)  # the reporter's executor thread: nothing else waits on it
            self._last = time.monotonic()
            self._released()
        return fired


class PlausibleProgressTracker(ProgressTracker):
    """Drops progress records whose epoch exceeds ``plausible_epoch_limit`` before hivemind folds them, and paces
    our own records (``PacedEvent``).

    Voters: every progress record, our own epoch, and (``steps``: owner key -> step, from the peers' metrics
    records) every peer that has not trained yet. The coordinator applies the same rule (``swarm_view``), so its
    step agrees. A dropped record's samples and throughput are ignored too: a record that lies about its epoch
    says nothing trustworthy about the rest.
    """

    def __init__(self, *args: Any, steps: Optional[Callable[[], Mapping[bytes, int]]] = None,
                 report_interval: float = REPORT_INTERVAL, start: bool, **kwargs: Any) -> None:
        self._steps_source = steps
        self._ignored: set[Any] = set()  # owners already warned about
        super().__init__(*args, start=False, **kwargs)
        # what the reporter last went on to store: its epoch, and whether any record of that epoch carried samples
        self._released_epoch, self._released_samples = self.local_progress.epoch, False
        self.should_report_progress = PacedEvent(report_interval, urgent=self._report_now, released=self._releasing)
        if start:
            self.start()

    def _report_now(self) -> bool:
        """Records that go out at once: a new epoch's (others' global epoch and sample counts hinge on it), our last
        one, and the first of an epoch with samples in it.

        The last rule is hivemind's: its reporter stores a record only while it saw one with samples in this or the
        previous global epoch ("synchronized and actively reporting"). Held back, a peer that trains through two
        epochs within one interval would fall silent for good (a lone peer with a small target batch does).
        """
        local = self.local_progress
        return (local.epoch != self._released_epoch or self.shutdown_triggered.is_set()
                or (local.samples_accumulated > 0 and not self._released_samples))

    def _releasing(self) -> None:
        local = self.local_progress  # hivemind's reporter reads and stores local_progress right after this
        if local.epoch != self._released_epoch:
            self._released_epoch, self._released_samples = local.epoch, False
        self._released_samples |= local.samples_accumulated > 0

    def _known_steps(self) -> Mapping[bytes, int]:
        # a cached dict the peer's main thread refreshes: this thread makes no DHT calls of its own
        return self._steps_source() if self._steps_source is not None else {}

    def _parse_swarm_progress_data(self, metadata: Any) -> GlobalTrainingProgress:
        if isinstance(metadata, dict) and metadata:
            claims = {owner: entry.value for owner, entry in metadata.items() if isinstance(entry.value, dict)}
            votes = {**self._known_steps(), self._local_public_key: self.local_progress.epoch}
            votes.update({owner: int(value.get("epoch", 0)) for owner, value in claims.items()
                          if not value.get("client_mode", False)})
            limit = plausible_epoch_limit(list(votes.values()))
            implausible = {owner for owner, value in claims.items() if int(value.get("epoch", 0)) > limit}
            for owner in implausible - self._ignored:
                logger.warning(f"ignoring a peer that claims epoch {claims[owner].get('epoch')} while most of the "
                               f"swarm is at {limit - 1} or below (a wrong clock, a bug, or an attack)")
            self._ignored |= implausible
            metadata = {owner: entry for owner, entry in metadata.items() if owner not in implausible}
        return super()._parse_swarm_progress_data(metadata)
