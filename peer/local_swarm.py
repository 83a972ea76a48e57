"""Run a whole swarm on this machine: demo data, a coordinator, a state replica and N CPU peers, then evaluate.

This is `make demo`, and the same topology docker/compose.yml describes, as plain local
processes on 127.0.0.1. Each process is the real CLI; their output is interleaved here with a
name prefix so one terminal shows the whole swarm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

from convforever.data import write_demo_dataset


@dataclass
class SwarmConfig:
    workdir: Path = Path("runs/demo")
    run_id: str = "demo"
    peers: int = 2
    max_steps: int = 30
    checkpoint_every: int = 10
    model: str = "convnext_atto"
    image_size: int = 32
    batch_size: int = 32
    target_batch_size: int = 512
    lr: float = 2e-3
    compression: str = "powersgd-8bit"
    train_rows: int = 3000
    eval_rows: int = 500
    shard_rows: int = 250  # 12 shards of the demo's 3000 rows: peers visibly lease, finish and re-lease them


def _pump(name: str, stream: IO[str], sink: IO[str]) -> None:
    for line in stream:
        sink.write(f"[{name}] {line}" if not line.startswith("[") else line)
        sink.flush()


class Process:
    """A child process whose output is prefixed and forwarded; it dies with its process group."""

    def __init__(self, name: str, argv: list[str], log: IO[str] = sys.stdout):
        self.name = name
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
        )
        self.thread = threading.Thread(target=_pump, args=(name, self.popen.stdout, log), daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.thread.join(timeout=5)
        return self.popen.returncode


def cli(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def wait_for_file(path: Path, process: Process, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text()
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited with code {process.popen.returncode} before writing {path}")
        time.sleep(0.2)
    raise TimeoutError(f"{process.name} did not write {path} within {timeout:.0f}s")


def run(config: SwarmConfig) -> dict:
    work = config.workdir
    data = work / "data"
    demo = write_demo_dataset(data, train_rows=config.train_rows, eval_rows=config.eval_rows,
                              image_size=config.image_size * 2, seed=0)
    print(f"[demo] {config.train_rows} training and {config.eval_rows} held-out images of {len(demo.categories)} "
          f"categories in {data}", flush=True)
    maddrs_file = work / "coordinator.maddrs"
    maddrs_file.unlink(missing_ok=True)
    checkpoints = work / "checkpoints"
    shutil.rmtree(checkpoints, ignore_errors=True)  # a new run: never evaluate a previous demo's checkpoint
    coordinator = Process("coordinator", cli("convforever.coordinator.cli") + [
        "--run-id", config.run_id, "--checkpoint-dir", str(checkpoints), "--checkpoint-every", str(config.checkpoint_every),
        "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--maddrs-file", str(maddrs_file), "--identity", str(work / "coordinator.key"),
        # The coordinator owns the data plan and leases shards to the peers, which therefore get no --data.
        "--dataset", str(data / "train"), "--shard-rows", str(config.shard_rows),
        "--http-host", "127.0.0.1", "--http-port", "0",
    ])
    peers: list[Process] = []
    replica: Optional[Process] = None
    try:
        initial_peers = wait_for_file(maddrs_file, coordinator, timeout=60).split()
        peer_args = cli("convforever.peer.cli") + [
            "--initial-peers", *initial_peers, "--run-id", config.run_id,
            "--model", config.model, "--image-size", str(config.image_size), "--batch-size", str(config.batch_size),
            "--target-batch-size", str(config.target_batch_size), "--max-steps", str(config.max_steps),
            "--lr", str(config.lr), "--compression", config.compression, "--warmup-steps", "3",
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--min-peers", str(config.peers),
            "--threads", str(max(1, (os.cpu_count() or 1) // config.peers)),
            "--no-augment",  # the ConvNeXt recipe (RandAugment, Mixup/CutMix, ...) is for long runs, not a few steps
        ]
        # A state replica next to the coordinator: it follows every step without training (so it does not count
        # towards --min-peers) and serves the state to peers that join later, so they need not slow a trainer.
        replica = Process("replica", peer_args + ["--role", "replica"])
        for i in range(config.peers):
            peers.append(Process(f"peer-{i + 1}", peer_args))
        while any(p.popen.poll() is None for p in peers):
            failed = [p.name for p in [*peers, replica] if p.popen.poll() not in (None, 0)]
            if failed or coordinator.popen.poll() is not None:
                raise RuntimeError(f"{', '.join(failed) or 'the coordinator'} stopped early; see the output above")
            time.sleep(0.5)
    finally:
        for p in peers:
            p.stop()
        if replica is not None:
            replica.stop()
        coordinator.stop()
    result = subprocess.run(
        cli("convforever.peer.evaluate") + ["--checkpoint", str(checkpoints), "--data", str(data / "eval")],
        check=True, capture_output=True, text=True,
    )
    return dict(json.loads(result.stdout), num_categories=len(demo.categories))


def main(argv: list[str] | None = None) -> None:
    d = SwarmConfig()
    p = argparse.ArgumentParser(prog="convforever-local-swarm", description=__doc__.splitlines()[0])
    for name, value in vars(d).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    config = SwarmConfig(**vars(p.parse_args(argv)))
    config.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = run(config)
    print(f"[demo] evaluated {config.workdir / 'checkpoints'} (step {result['checkpoint_step']}) on "
          f"{result['samples']} held-out images: top-1 {result['top1']:.3f}, top-5 {result['top5']:.3f} "
          f"(chance {1 / result['num_categories']:.2f}); wall time {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
