"""The peer's progress tracker (peer/progress.py) publishes its progress at a bounded rate within an epoch, at once
for a new epoch, and always the newest figures (a real tracker on a loopback DHT)."""

from __future__ import annotations

import time

import hivemind
import pytest

from convforever.peer import progress
from convforever.peer.progress import PacedEvent, PlausibleProgressTracker


def test_paced_event_holds_back_a_second_wake_up_unless_urgent(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(progress.time, "sleep", slept.append)
    urgent = False
    event = PacedEvent(interval=10.0, urgent=lambda: urgent)
    assert not event.wait(0) and slept == []  # not set: no wake-up to hold back
    event.set()
    assert event.wait(0) and slept == []  # the first wake-up goes at once
    assert event.wait(0) and len(slept) == 1 and 9 < slept[0] <= 10  # the next one waits out the interval
    urgent = True
    assert event.wait(0) and len(slept) == 1


class CountingDHT:
    """A real DHT that counts the stores to one key."""

    def __init__(self, dht: hivemind.DHT, key: str) -> None:
        self._dht, self._key, self.stores = dht, key, 0

    def store(self, key, *args, **kwargs):
        self.stores += key == self._key
        return self._dht.store(key, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._dht, name)


@pytest.fixture
def tracker():
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    counted = CountingDHT(dht, "paced_progress")
    made = PlausibleProgressTracker(dht=counted, prefix="paced", target_batch_size=10**6, report_interval=3.0,
                                    start=True)
    yield made, counted
    made.shutdown(timeout=5)
    dht.shutdown()


def own_record(made: PlausibleProgressTracker) -> dict:
    found = made.dht.get(made.training_progress_key, latest=True)
    entry = found.value.get(made._local_public_key) if found is not None else None
    return entry.value if entry is not None else {}


def wait_for_record(made: PlausibleProgressTracker, epoch: int, samples: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = own_record(made)
        if record.get("epoch") == epoch and record.get("samples_accumulated") == samples:
            return True
        time.sleep(0.1)
    return False


def test_progress_is_stored_once_per_interval_with_the_newest_figures_and_a_new_epoch_at_once(tracker):
    made, counted = tracker
    for samples in range(1, 21):  # 20 local steps in about a second: hivemind would store 20 records
        made.report_local_progress(0, samples * 16)
        time.sleep(0.05)
    assert wait_for_record(made, 0, 320, timeout=10)  # the newest figure is what went out
    within_epoch = counted.stores
    assert 1 <= within_epoch <= 3, within_epoch  # the first at once, then one per 3 s
    made.report_local_progress(1, 0)  # a new epoch: others' global epoch hinges on it, so no holding back
    assert wait_for_record(made, 1, 0, timeout=2.5)
