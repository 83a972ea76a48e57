"""The peer's progress tracker (peer/progress.py) publishes its progress at a bounded rate within an epoch, at once
for a new epoch, and always the newest figures (a real tracker on a loopback DHT)."""

from __future__ import annotations

import threading
import time

import hivemind
import pytest

from convforever.peer.progress import PacedEvent, PlausibleProgressTracker


def test_paced_event_holds_back_a_second_wake_up_until_the_interval_ends_or_a_report_is_urgent():
    urgent, released = False, []
    event = PacedEvent(interval=0.5, urgent=lambda: urgent, released=lambda: released.append(time.monotonic()))
    assert not event.wait(0) and released == []  # not set: no wake-up to hold back
    event.set()
    assert event.wait(0) and len(released) == 1  # the first wake-up goes at once
    assert event.wait(0) and len(released) == 2 and released[1] - released[0] >= 0.45  # the next waits it out

    event = PacedEvent(interval=60.0, urgent=lambda: urgent, released=lambda: released.append(time.monotonic()))
    event.set()
    assert event.wait(0)

    def urgent_report() -> None:
        nonlocal urgent
        time.sleep(0.2)
        urgent = True
        event.set()

    threading.Thread(target=urgent_report).start()
    assert event.wait(0) and len(released) == 4 and released[3] - released[2] < 30  # woken, not after 60 s


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


def test_a_peer_that_trains_through_epochs_faster_than_the_interval_keeps_reporting(tracker):
    """hivemind's reporter stores nothing once it has seen no record with samples in the last two global epochs;
    holding those back silenced a lone peer with a small target batch for good (the coordinator then never saw its
    step, nor checkpointed it)."""
    made, _ = tracker
    made.report_local_progress(0, 16)
    for epoch in (1, 2, 3):  # steps 0.2 s apart, three epochs within one 3 s interval, as the Optimizer makes them
        with made.pause_updates():
            made.update_epoch(epoch)
        for samples in (16, 32):
            time.sleep(0.2)
            made.report_local_progress(epoch, samples)
    time.sleep(0.2)
    with made.pause_updates():
        made.update_epoch(4)
    assert wait_for_record(made, 4, 0, timeout=2.5)
