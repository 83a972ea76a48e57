"""The state replica (`convforever-peer --role replica`): a weight-0 peer that follows the swarm and serves its state.

The slow test runs a real swarm on loopback through the CLIs: a coordinator, two training peers and a replica; a
third training peer joins after a few steps and must download the state from the replica, the replica's weights must
stay with the training peers', the swarm must not count it as a training peer, and a replica started with a
different recipe must refuse to follow.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import procs as processes
import pytest
import torch
from safetensors.torch import load_file

from convforever.model import ModelConfig, create_model
from convforever.peer.cli import parse_args
from convforever.peer.config import recipe_hash
from convforever.peer.trainer import initial_seed

MAX_STEPS = 7
JOIN_AT = 3  # the third training peer starts once the first reports this step
RUN_ID = "rep"


def test_recipe_hash_covers_the_recipe_and_nothing_local():
    base = ["--run-id", "r", "--model", "convnext_atto", "--lr", "2e-3"]
    config = parse_args(base)
    assert recipe_hash(config) == recipe_hash(parse_args(base)) and len(recipe_hash(config)) == 12
    for changed in (["--lr", "3e-3"], ["--target-batch-size", "512"], ["--compression", "none"], ["--rank", "8"],
                    ["--model", "convnext_femto"], ["--no-ema"], ["--average-state-every", "7"],
                    ["--warmup-steps", "1"]):
        assert recipe_hash(parse_args(base + changed)) != recipe_hash(config), changed
    for local in (["--threads", "1"], ["--report-every", "1"], ["--batch-size", "8"], ["--device", "cpu"],
                  ["--seed", "3"], ["--num-workers", "0"], ["--role", "replica"], ["--max-steps", "5"]):
        assert recipe_hash(parse_args(base + local)) == recipe_hash(config), local
    assert recipe_hash(dataclasses.replace(config, recipe=dataclasses.replace(config.recipe, ema_device="cuda"))) \
        == recipe_hash(config)


def start(args: list[str], log: Path) -> subprocess.Popen:
    return processes.start([sys.executable, "-m", *args], log)


def wait_for(path: Path, pattern: str, procs: list[subprocess.Popen], timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, path.read_text(errors="replace"), flags=re.M) if path.is_file() else None
        if found:
            return found
        assert all(p.poll() is None for p in procs), f"a process exited early; see {path}"
        time.sleep(0.3)
    raise TimeoutError(f"{pattern!r} not in {path} within {timeout:.0f}s")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    work = tmp_path_factory.mktemp("replica")
    subprocess.run([sys.executable, "-m", "convforever.data.demo", "--out", str(work / "data"), "--train-rows", "800",
                    "--eval-rows", "50", "--image-size", "48", "--seed", "1"], check=True, capture_output=True)
    maddrs = work / "maddrs.txt"
    coordinator = start(["convforever.coordinator.cli", "--run-id", RUN_ID, "--checkpoint-dir", str(work / "ckpt"),
                         "--checkpoint-every", "1000", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--maddrs-file",
                         str(maddrs), "--status-every", "1", "--http-host", "127.0.0.1", "--http-port", "0"],
                        work / "coordinator.log")
    procs: dict[str, subprocess.Popen] = {}
    try:
        wait_for(maddrs, r"\S", [coordinator], 60)
        common = [
            "convforever.peer.cli", "--initial-peers", *maddrs.read_text().split(), "--run-id", RUN_ID,
            "--model", "convnext_atto", "--image-size", "32", "--batch-size", "16", "--target-batch-size", "128",
            "--max-steps", str(MAX_STEPS), "--lr", "2e-3", "--warmup-steps", "1", "--matchmaking-time", "5", "--powersgd-warmup", "2",
            "--report-every", "1", "--num-workers", "0", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--exit-grace", "0",
            "--min-peers", "2", "--threads", "1", "--no-augment",
        ]
        data = ["--data", str(work / "data" / "train")]
        procs["replica"] = start(common + ["--role", "replica", "-v", "--save-on-exit", str(work / "replica")],
                                 work / "replica.log")
        # Another recipe (--lr): it must refuse once the training peers have announced theirs.
        wrong = [a if a != "2e-3" else "3e-3" for a in common]
        procs["wrong"] = start(wrong + ["--role", "replica"], work / "wrong.log")
        for name, seed in (("a", "1"), ("b", "2")):
            procs[name] = start(common + data + ["--seed", seed, "--save-on-exit", str(work / name)],
                                work / f"{name}.log")
        wait_for(work / "a.log", rf"^step ({'|'.join(str(s) for s in range(JOIN_AT, MAX_STEPS + 1))}) \|",
                 [procs["a"], procs["replica"]], 150)
        before_join = (work / "a.log").read_text(), (work / "coordinator.log").read_text()
        procs["c"] = start(common + data + ["--seed", "3", "-v"], work / "c.log")
        codes = {name: p.wait(timeout=240) for name, p in procs.items()}
    finally:
        for p in procs.values():
            processes.kill(p)
        coordinator.send_signal(2)
        try:
            coordinator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            processes.kill(coordinator)
    logs = {name: (work / f"{name}.log").read_text(errors="replace") for name in [*procs, "coordinator"]}
    return work, codes, logs, before_join


def peer_id(log: str) -> str:
    return re.search(r"can also join through: \S+/p2p/(\w+)", log).group(1)


@pytest.mark.slow
def test_processes_exit_cleanly(swarm):
    _, codes, logs, _ = swarm
    assert codes["a"] == codes["b"] == codes["c"] == codes["replica"] == 0, {k: logs[k][-3000:] for k in codes}


@pytest.mark.slow
def test_joiner_downloads_the_state_from_the_replica(swarm):
    _, _, logs, _ = swarm
    sources = re.findall(r"Downloading parameters from peer (\w+)", logs["c"])
    assert sources, logs["c"][-3000:]
    assert sources[0] == peer_id(logs["replica"]), (sources, peer_id(logs["replica"]))
    served = [int(n) for n in re.findall(r"^replica step \d+ \| .* \| served (\d+) states", logs["replica"], re.M)]
    assert served and served[-1] >= 1, logs["replica"][-3000:]


@pytest.mark.slow
def test_replica_follows_the_training_peers(swarm):
    """As close to training peer a as training peer b is (the tolerance two training peers keep), and not at init."""
    work, _, logs, _ = swarm
    assert re.search(rf"^replica step {MAX_STEPS} \| in sync", logs["replica"], re.M), logs["replica"][-3000:]
    assert "group 3" in logs["replica"]  # it took part in the rounds with both training peers
    saved = {name: load_file(str(work / name / f"step-{MAX_STEPS}" / "model.safetensors"))
             for name in ("replica", "a", "b")}
    assert saved["replica"].keys() == saved["a"].keys()
    torch.manual_seed(initial_seed(RUN_ID))
    saved["init"] = create_model(ModelConfig(name="convnext_atto")).state_dict()
    flat = {name: torch.cat([d[k].flatten() for k in sorted(saved["a"])]) for name, d in saved.items()}
    moved = (flat["a"] - flat["init"]).norm()
    assert moved > 0

    def distance(x: str, y: str) -> float:  # in units of the distance training moved peer a
        return ((flat[x] - flat[y]).norm() / moved).item()

    print(f"distance from a, over a's distance from init: replica {distance('replica', 'a'):.4f}, "
          f"b {distance('b', 'a'):.4f}; replica from init {distance('replica', 'init'):.4f}")
    # Measured: replica 0.02-0.84 and b 0.005-0.84 from a (each peer's own 8-bit rounding errors, amplified by
    # AdamW's normalisation, over 7 steps), within 2x of each other (or the replica under 0.05) in 14 runs. What this
    # guards against, reproduced once: a replica that missed 3 rounds and stepped on its own zero gradients sat
    # 0.81 from a while b was 0.005 away.
    assert distance("replica", "a") <= max(2 * distance("b", "a"), 0.25)
    assert distance("replica", "init") > 0.5  # it moved with the swarm (a replica that never followed: 0)


@pytest.mark.slow
def test_replica_is_not_counted_as_a_training_peer(swarm):
    _, _, logs, (a_before, coordinator_before) = swarm
    peers = [int(n) for n in re.findall(r"^step \d+ \| .*\| peers (\d+)", a_before, re.M)]
    assert peers and max(peers) == 2, a_before[-3000:]
    status = [int(n) for n in re.findall(r"\bpeers (\d+)", coordinator_before)]
    assert status and max(status) == 2, coordinator_before[-3000:]


@pytest.mark.slow
def test_replica_with_another_recipe_refuses(swarm):
    _, codes, logs, _ = swarm
    assert codes["wrong"] != 0
    assert "recipe differs from the swarm's" in logs["wrong"] and "recipe hash" in logs["wrong"], logs["wrong"][-3000:]
    assert "Traceback" not in logs["wrong"]
