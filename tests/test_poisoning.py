"""Poisoning and spoofing from real peers: two honest peers train beside one that sends NaN and one that sends -1e6x
its gradients, all four in one all-reduce group, while a fifth process claims epoch 10**6 in its signed progress
record (tests/faulty_peer.py); everything through the real CLIs on loopback.

What must hold: the honest peers reach their last step with finite weights, each says it dropped an attacker's data
and ignored the epoch claim, each attacker's data was dropped, and each honest peer's final weights score a lower
loss than the initial ones. Without the guard the NaN peer makes every honest update non-finite, and the epoch claim
kept every honest peer reloading state at step 0.

The ascent peer's parts came in at 35x-1e6x ours (ConvNeXt's layer scale makes some parts of a gradient ~1e-4 of
the rest); with a 1000x bar per part, those after the first refused one were averaged in. Now a sender with one part
refused has the rest of that all-reduce refused too (tests/test_guard.py).

The attackers serve their state like any peer. Before the joiner's check of a downloaded state (a loss on its own
latest batch, Peer.check_downloaded_state), honest peers that joined after the ascent peer had stepped on its own
poison loaded it: in 2 of 4 runs both honest peers' loss went 3.9 -> 7.0 at once, and their final loss on the
training rows was 5.2-5.4 against 3.9 at init.

The guard does not promise a falling loss when attackers under the bar are half of a round: with a third attacker at
-30x beside these (three attackers to two honest peers), even with the centered clipping the guard had then
(since removed, compression/guard.py), the honest loss went 3.9 -> 7.0.
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

from convforever.data import DataConfig
from convforever.model import ModelConfig, create_model
from convforever.model.checkpoint import load_checkpoint
from convforever.peer.evaluate import evaluate
from convforever.peer.trainer import initial_seed

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
    # NaN, keeps reloading and misses rounds): each attacker that sent gradients must have been caught by at least
    # one of them. In 1 of 8 runs the NaN peer could not dial the honest peers at all (libp2p "dial backoff" on
    # every attempt) and sent nothing the whole run: nothing of it to catch, but one attacker at least must be.
    caught = 0
    for kind, attacker in attackers.items():
        sent_nothing = re.findall(r"^step \d+ \|.*\| sent (\S+ \S+) recv", logs[kind], re.M)[-1:] == ["0 B"]
        if sent_nothing:
            continue
        assert any(f"dropped data from peer {attacker}" in log for log in honest), (kind, honest)
        caught += 1
    assert caught >= 1


def test_honest_peers_learn_beside_the_attackers(swarm):
    """Each honest peer's final weights score a lower loss on the training rows than the run's seeded initial weights
    (what every peer starts from). The loss printed per step is too noisy for this: 128 samples, +-0.3 between
    steps of an unattacked run."""
    work, _, _ = swarm
    data = DataConfig(files=str(work / "data" / "train"), image_size=32, batch_size=100, train=False, num_workers=0)
    losses = {}
    for i in range(2):
        model, config = load_checkpoint(next((work / f"honest{i}").rglob("model.safetensors")).parent)
        losses[f"honest{i}"] = evaluate(model, data, torch.device("cpu"))["loss"]
    torch.manual_seed(initial_seed("p"))
    losses["initial"] = evaluate(create_model(ModelConfig.from_dict(config["model"])), data, torch.device("cpu"))["loss"]
    for i in range(2):
        assert losses[f"honest{i}"] < 0.9 * losses["initial"], losses


def test_honest_peers_ignore_a_far_future_epoch_claim(swarm):
    _, _, logs = swarm
    assert "claiming epoch 10**6" in logs["future-epoch"], logs["future-epoch"]
    for i in range(2):
        assert "ignoring a peer that claims epoch 1000000" in logs[f"honest{i}"]
