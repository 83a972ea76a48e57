"""The checked state download (compression/guard.py, CheckedDownloadMixin): real state averagers, each with its
averager process, on a loopback DHT. A donor whose state the joiner's check refuses is not asked again, and the
joiner loads the next donor's state instead; with no check, hivemind's choice (the highest priority) is loaded."""

from __future__ import annotations

import time

import hivemind
import pytest
import torch

from convforever.compression.guard import GuardedTrainingStateAverager

PREFIX = "download_test_state_averager"


def averager(dht: hivemind.DHT, value: float, priority: float) -> GuardedTrainingStateAverager:
    model = torch.nn.Linear(8, 4)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(value)
    made = GuardedTrainingStateAverager(dht=dht, prefix=PREFIX, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        start=True)
    made.state_sharing_priority = priority
    return made


def weights(made: GuardedTrainingStateAverager) -> float:
    return float(made.main_parameters[0].mean())


@pytest.fixture
def swarm():
    """A poisoned donor (values 1e3, the highest priority), an honest one (1.0) and a joiner (0.0)."""
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    maddrs = [str(m) for m in first.get_visible_maddrs()]
    dhts = [first] + [hivemind.DHT(start=True, initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
                      for _ in range(2)]
    made = {"poisoned": averager(dhts[0], 1e3, priority=10.0), "honest": averager(dhts[1], 1.0, priority=5.0),
            "joiner": averager(dhts[2], 0.0, priority=0.0)}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # both donors declared in the DHT
        found = dhts[2].get(f"{PREFIX}.all_averagers", latest=True)
        if found is not None and len(found.value) >= 3:
            break
        time.sleep(0.5)
    yield made
    for one in made.values():
        one.shutdown()
    for dht in dhts:
        dht.shutdown()


def test_a_refused_donor_is_skipped_for_the_next(swarm):
    joiner = swarm["joiner"]
    checked = []

    def check(parameters):
        checked.append(float(parameters[0].mean()))
        return "absurd parameters" if parameters[0].abs().max() > 100 else None

    joiner.state_check = check
    joiner.load_state_from_peers(timeout=30)
    assert checked == [1e3, 1.0]  # the poisoned donor first (highest priority), then the honest one
    assert weights(joiner) == 1.0
    assert joiner.refused_donors == [str(swarm["poisoned"].peer_id)]
    joiner.load_state_from_peers(timeout=30)  # the refused donor is not asked again
    assert checked == [1e3, 1.0, 1.0]
    # ...until its refusal expires: then it is checked again (and refused again)
    joiner._refused_donors = {peer: at - joiner.refusal_ttl for peer, at in joiner._refused_donors.items()}
    joiner.load_state_from_peers(timeout=30)
    assert checked == [1e3, 1.0, 1.0, 1e3, 1.0] and weights(joiner) == 1.0


def test_without_a_check_the_highest_priority_state_is_loaded(swarm):
    joiner = swarm["joiner"]
    joiner.load_state_from_peers(timeout=30)
    assert weights(joiner) == 1e3
