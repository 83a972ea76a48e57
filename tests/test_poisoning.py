"""Poisoning and spoofing from real peers: two honest peers train beside one that sends NaN and one that sends -1e6x
its gradients, all four in one all-reduce group, while a fifth process claims epoch 10**6 in its signed progress
record (tests/faulty_peer.py); everything through the real CLIs on loopback.

What must hold: the honest peers reach their last step with finite weights, each says it dropped an attacker's data
and ignored the epoch claim, and each attacker's data was dropped. Without the guard the NaN peer makes every honest
update non-finite, and the epoch claim kept every honest peer reloading state at step 0.

The ascent peer's -1e6x parts are refused while they are more than 1000x ours; its own gradients shrink as its
weights go bad, and parts that fall under that bar are averaged in (before the epoch vote and warm-up, one run went
4.0 -> 5.1 -> 3.2). A falling loss is therefore not asserted: it fell in 5 runs of this session, and in the 6th
(a fresh-clone CI run) it went 3.0 -> 4.3 when such parts came in.

What the guard does not promise: a falling loss when attackers under the bar are half of a round. Measured with a
third attacker at -30x beside these (three attackers to two honest peers), with the guard's centered clipping on
(off by default, compression/guard.py): the honest loss went 3.9 -> 7.0.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import kill, start, wait_for_text
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

MAX_STEPS = 8
ATTACKS = ("nan", "ascent")
HERE = Path(__file__).parent


def peer_id(log: str) -> str:
    return re.search(r"can also join through: \S+/p2p/(\w+)", log).group(1)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    work = tmp_path_factory.mktemp("poison")
    subprocess.run([sys.executable, "-m", "convforever.data.demo", "--out", str(work / "data"), "--train-rows", "800",
                    "--eval-rows", "20", "--image-size", "32", "--seed", "2"], check=True, capture_output=True)
    maddrs = work / "maddrs.txt"
    coordinator = start(
        [sys.executable, "-m", "convforever.coordinator.cli", "--run-id", "p", "--checkpoint-dir", str(work / "ckpt"),
         "--checkpoint-every", "1000", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--maddrs-file", str(maddrs),
         "--http-port", "0", "--http-host", "127.0.0.1"], work / "coordinator.log")
    procs: dict[str, subprocess.Popen] = {}
    try:
        initial = wait_for_text(maddrs, coordinator, 60).split()
        common = ["--initial-peers", *initial, "--run-id", "p", "--data", str(work / "data" / "train"),
                  "--model", "convnext_atto", "--depth", "4", "--image-size", "32", "--batch-size", "16",
                  "--target-batch-size", "128", "--lr", "2e-3", "--warmup-steps", "1", "--matchmaking-time", "3",
                  "--averaging-timeout", "20", "--report-every", "1", "--num-workers", "0", "--threads", "1",
                  "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--min-peers", "4", "--exit-grace", "0", "--no-augment"]
        for kind in (*ATTACKS, "future-epoch"):
            procs[kind] = start([sys.executable, str(HERE / "faulty_peer.py"), kind, "--", *common], work / f"{kind}.log")
        for i in range(2):
            procs[f"honest{i}"] = start([sys.executable, "-m", "convforever.peer.cli", *common, "--max-steps",
                                         str(MAX_STEPS), "--save-on-exit", str(work / f"honest{i}")],
                                        work / f"honest{i}.log")
        codes = [procs[f"honest{i}"].wait(timeout=420) for i in range(2)]
    finally:
        for proc in [*procs.values(), coordinator]:
            kill(proc)
    logs = {path.stem: path.read_text() for path in work.glob("*.log")}
    return work, codes, logs


def test_honest_peers_finish_with_finite_weights(swarm):
    work, codes, logs = swarm
    assert codes == [0, 0], logs
    for i in range(2):
        log = logs[f"honest{i}"]
        steps = [int(s) for s in re.findall(r"^step (\d+) \|", log, re.M)]
        assert steps and steps[-1] >= MAX_STEPS, log
        weights = load_file(next((work / f"honest{i}").rglob("model.safetensors")))
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_honest_peers_averaged_with_the_attackers_and_dropped_their_data(swarm):
    _, _, logs = swarm
    attackers = {kind: peer_id(logs[kind]) for kind in ATTACKS}
    honest = [logs[f"honest{i}"] for i in range(2)]
    for log in honest:
        sizes = json.loads(re.search(r"all-reduce group sizes: (\{.*\})", log).group(1))
        assert any(int(size) >= 3 for size in sizes), sizes  # the attackers really were in the group
        assert "dropped data from peer" in log, log
    # Which honest peer meets which attacker in a full round is up to matchmaking (the NaN peer, whose own state is
    # NaN, keeps reloading and misses rounds): each attacker must have been caught by at least one of them.
    for kind, attacker in attackers.items():
        assert any(f"dropped data from peer {attacker}" in log for log in honest), (kind, honest)


def test_honest_peers_ignore_a_far_future_epoch_claim(swarm):
    _, _, logs = swarm
    assert "claiming epoch 10**6" in logs["future-epoch"], logs["future-epoch"]
    for i in range(2):
        assert "ignoring a peer that claims epoch 1000000" in logs[f"honest{i}"]
