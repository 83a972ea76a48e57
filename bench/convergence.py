"""Convergence parity on MNIST: a single-process baseline against a 2-peer swarm in each compression mode.

Compression only earns its place if the swarm still learns what one process would. This runs the real CLIs on
127.0.0.1: MNIST (``../shared/data/mnist.npz``) is written once as ImageNet-style parquet (PNG bytes + integer
``label``) under the work dir; each run starts a coordinator that leases the training shards, so the peers of a
swarm read disjoint samples and the swarm as a whole sees the same data the baseline peer sees alone. Every run
has the same run id (so the same seeded initial weights), the same global batch (``--target-batch-size``), the
same number of global steps and the same recipe; only the number of peers and ``--compression``/``--rank``
differ. Each peer saves its final weights (``--save-on-exit``) and ``convforever-eval`` scores them on the
10,000 MNIST test images.

The baseline is one peer with ``--min-peers 1``: hivemind.Optimizer finds no other peer at each step, skips the
all-reduce and applies its own (uncompressed) accumulated gradient, i.e. plain large-batch AdamW.

    python bench/convergence.py [--steps 60] [--modes baseline none powersgd-8bit:4 ...] [--reuse] [--no-append]

A mode is ``baseline`` or ``MODE[:RANK][+wN][@LAYOUT[/WHOLE]]`` with MODE one of ``--compression``'s choices (RANK
for PowerSGD; ``+wN``: ``--powersgd-warmup N``, the first N global steps average whole gradients; ``@flat`` or
``@per-tensor``: ``--powersgd-layout``, else the peer's default; ``/fp16`` or ``/8bit``: ``--whole-codec``, how the
flat layout sends the tensors PowerSGD leaves whole).
The ``none`` swarm averages exactly, so its distance from the baseline is the comparison's own noise (which
samples each peer leased, in which order, when each all-reduce happened): read the other rows against it.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from results import append_results  # noqa: E402  (bench/ is on sys.path when run as a script)

from convforever.compression import LAYOUTS, MODES, WHOLE_CODECS
from convforever.peer.local_swarm import Process, cli, wait_for_file

logger = logging.getLogger("bench.convergence")
REPO = Path(__file__).resolve().parent.parent
MNIST = REPO.parent / "shared" / "data" / "mnist.npz"
BASELINE = "baseline"
DEFAULT_MODES = ["baseline", "none", "fp16", "8bit", "powersgd-8bit:1", "powersgd-8bit:2", "powersgd-8bit:4",
                 "powersgd:4"]
IMAGE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("label", pa.int64()),
])


@dataclass
class BenchConfig:
    """Everything that shapes a run; the same for the baseline and every swarm so their accuracies compare."""

    workdir: Path = REPO / "runs" / "convergence"
    mnist: Path = MNIST
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    peers: int = 2
    model: str = "convnext_atto"
    # MNIST's 28 px digits: the train transform takes random crops (35-100% of the area) resized to this size,
    # the eval transform the central 87.5% (24.5 px, which holds the 20 px digit) resized to it.
    image_size: int = 32
    # Our classifier keeps at least the 50 caption categories (PeerConfig checks it); digits use classes 0-9.
    num_classes: int = 50
    batch_size: int = 32
    target_batch_size: int = 256
    steps: int = 60
    lr: float = 2e-3
    warmup_steps: int = 5
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    threads: int = 1  # per swarm peer; the baseline gets peers * threads, the same cores as a whole swarm
    num_workers: int = 1
    seed: int = 0  # the peers' data order (peer i gets seed + i); the initial weights come from run_id
    run_id: str = "mnist"  # the same for every run: peers seed their initial weights from it
    shard_rows: int = 2000
    row_group_rows: int = 1000
    matchmaking_time: float = 1.5
    averaging_timeout: float = 30.0
    run_timeout: float = 900.0  # seconds before a stuck run is stopped and reported as failed
    append: bool = True
    # Take a run's result from its earlier result.json when its settings match (a long table can be built in parts,
    # e.g. the modes whose code is settled first); the table says when each row ran.
    reuse: bool = False

    def fingerprint(self, spec: RunSpec) -> dict:
        """What a cached result must match to stand in for a new run."""
        ignored = ("workdir", "mnist", "modes", "run_timeout", "append", "reuse")
        # a field that is unset (None) stays out, so results cached before it existed still match
        spec_fields = {k: v for k, v in asdict(spec).items() if v is not None or k != "whole"}
        return {"spec": spec_fields, **{k: v for k, v in asdict(self).items() if k not in ignored}}

    def __post_init__(self) -> None:
        for spec in self.modes:
            parse_mode(spec)
        if self.steps <= self.warmup_steps:
            raise ValueError(f"--steps {self.steps} must exceed --warmup-steps {self.warmup_steps} (the lr decays after it)")

    def recipe_args(self) -> list[str]:
        """The flags every peer of every run shares (the hyperparameters of the comparison)."""
        return [
            "--run-id", self.run_id, "--model", self.model, "--num-classes", str(self.num_classes),
            "--image-size", str(self.image_size), "--batch-size", str(self.batch_size),
            "--target-batch-size", str(self.target_batch_size), "--max-steps", str(self.steps),
            "--total-steps", str(self.steps), "--lr", str(self.lr), "--warmup-steps", str(self.warmup_steps),
            "--min-lr", str(self.min_lr), "--weight-decay", str(self.weight_decay),
            # The ConvNeXt recipe's augmentations and EMA are for long runs; here they would only slow learning.
            "--no-augment", "--no-ema",
            "--matchmaking-time", str(self.matchmaking_time), "--averaging-timeout", str(self.averaging_timeout),
            "--num-workers", str(self.num_workers), "--device", "cpu", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
            "--report-every", "10", "--exit-grace", "0",
        ]


@dataclass
class RunSpec:
    """One row of the table: the baseline, or a swarm in one compression mode."""

    name: str
    mode: str  # a --compression choice ("none" for the baseline, whose peer never averages)
    rank: Optional[int]
    peers: int
    warmup: int = 0  # --powersgd-warmup: global steps of whole-gradient averaging before PowerSGD
    layout: Optional[str] = None  # --powersgd-layout (None: the peer's default)
    whole: Optional[str] = None  # --whole-codec (None: the peer's default)


@dataclass
class PeerOutcome:
    """What one peer's output and saved weights tell about its run."""

    top1: float = math.nan
    top5: float = math.nan
    step: int = 0
    loss: float = math.nan
    group_sizes: dict[str, int] = field(default_factory=dict)
    bytes_per_round: float = math.nan
    ratio_vs_fp32: float = math.nan


@dataclass
class RunResult:
    """One row of the table: the run as a whole, and each of its peers."""

    spec: RunSpec
    wall_s: float
    peers: list[PeerOutcome]
    error: str = ""
    finished: str = ""  # UTC time the run ended: with --reuse, rows of one table can come from different hours

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        return cls(RunSpec(**d["spec"]), d["wall_s"], [PeerOutcome(**p) for p in d["peers"]], d["error"],
                   d["finished"])

    @property
    def top1(self) -> float:
        """Mean over the peers: with quantised averaging the peers' weights can differ slightly."""
        values = [p.top1 for p in self.peers if math.isfinite(p.top1)]
        return sum(values) / len(values) if values else math.nan

    @property
    def loss(self) -> float:
        values = [p.loss for p in self.peers if math.isfinite(p.loss)]
        return sum(values) / len(values) if values else math.nan


def parse_mode(spec: str, peers: int = 2) -> RunSpec:
    """``baseline`` or ``MODE[:RANK]`` -> RunSpec; a bad spec fails before anything starts."""
    if spec == BASELINE:
        return RunSpec(BASELINE, "none", None, 1)
    spec_body, _, layout = spec.partition("@")
    layout, _, whole = layout.partition("/")
    if layout and layout not in LAYOUTS:
        raise ValueError(f"mode {spec!r}: @LAYOUT is one of {', '.join(LAYOUTS)}")
    if whole and (whole not in WHOLE_CODECS or layout != "flat"):
        raise ValueError(f"mode {spec!r}: /WHOLE follows @flat and is one of {', '.join(WHOLE_CODECS)}")
    head, _, warm = spec_body.partition("+w")
    if warm and not warm.isdigit():
        raise ValueError(f"mode {spec!r}: +wN takes a whole number of warm-up steps")
    mode, _, rank = head.partition(":")
    if (warm or layout) and not mode.startswith("powersgd"):
        raise ValueError(f"mode {spec!r}: only PowerSGD modes take a warm-up (+wN) or a layout (@LAYOUT)")
    if mode not in MODES:
        raise ValueError(f"mode {spec!r}: use {BASELINE} or one of {', '.join(MODES)}, with :RANK for PowerSGD")
    if rank and not mode.startswith("powersgd"):
        raise ValueError(f"mode {spec!r}: only PowerSGD modes take a rank")
    if mode.startswith("powersgd"):
        return RunSpec(spec, mode, int(rank or 4), peers, int(warm or 0), layout or None, whole or None)
    return RunSpec(spec, mode, None, peers)


# ------------------------------------------------------------------------------------------------- data


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # 2-D uint8: greyscale ("L")
    return buffer.getvalue()


def write_split(images: np.ndarray, labels: np.ndarray, path: Path, prefix: str, row_group_rows: int) -> None:
    """ImageNet-style parquet (``image`` struct of PNG bytes, integer ``label``), written atomically.

    Row groups are the unit the coordinator cuts shards from, so their size sets how finely data is leased.
    """
    table = pa.table({
        "id": [f"{prefix}-{i}" for i in range(len(labels))],
        "image": [{"bytes": _png(image), "path": None} for image in images],
        "label": labels.astype(np.int64),
    }, schema=IMAGE_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=row_group_rows)
    tmp.replace(path)


def prepare_mnist(npz: Path, out: Path, seed: int, row_group_rows: int) -> tuple[Path, Path]:
    """(train dir, test file) under ``out``, converted once and reused by later invocations.

    The training rows are shuffled once with ``seed`` so every shard holds every digit (MNIST's own order is
    not sorted, but a fixed shuffle makes that a property of the benchmark rather than of the file).
    """
    train_dir, test_file = out / "train", out / "test" / "mnist-test.parquet"
    train_file = train_dir / "mnist-train.parquet"
    if train_file.is_file() and test_file.is_file():
        return train_dir, test_file
    if not npz.is_file():
        raise SystemExit(f"convergence: {npz} not found: it is the standard MNIST split (x_train, y_train, x_test, "
                         "y_test), kept outside the repository in ../shared/data/; pass --mnist PATH")
    with np.load(npz) as arrays:
        x_train, y_train, x_test, y_test = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    order = np.random.default_rng(seed).permutation(len(y_train))
    write_split(x_train[order], y_train[order], train_file, "train", row_group_rows)
    write_split(x_test, y_test, test_file, "test", row_group_rows)
    logger.info(f"MNIST written as parquet: {len(y_train)} train rows in {train_dir}, {len(y_test)} test rows")
    return train_dir, test_file


# --------------------------------------------------------------------------------------------- processes


class LineLog:
    """A sink for `Process` output: every line goes to a log file and is kept for parsing; progress is echoed."""

    def __init__(self, path: Path) -> None:
        self.lines: list[str] = []
        self.file = path.open("w", encoding="utf-8")
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            self.lines.append(text)
            self.file.write(text)
            if " | loss " in text or ": error:" in text or "waiting for peers" in text:
                sys.stdout.write("    " + text)

    def flush(self) -> None:
        with self.lock:
            self.file.flush()
            sys.stdout.flush()

    def close(self) -> None:
        with self.lock:
            self.file.close()

    def of(self, name: str) -> list[str]:
        with self.lock:
            return [line[len(name) + 3:] for line in self.lines if line.startswith(f"[{name}] ")]


def start_coordinator(config: BenchConfig, train_dir: Path, run_dir: Path, log: LineLog) -> tuple[Process, list[str]]:
    """A coordinator that leases the training shards; it checkpoints never (peers save their own weights)."""
    maddrs = run_dir / "coordinator.maddrs"
    coordinator = Process("coordinator", cli("convforever.coordinator.cli") + [
        "--run-id", config.run_id, "--checkpoint-dir", str(run_dir / "checkpoints"),
        "--checkpoint-every", str(10 * config.steps), "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
        "--maddrs-file", str(maddrs), "--dataset", str(train_dir), "--shard-rows", str(config.shard_rows),
        "--http-host", "127.0.0.1", "--http-port", "0", "--status-every", "30",
    ], log=log)
    return coordinator, wait_for_file(maddrs, coordinator, timeout=120).split()


def peer_argv(config: BenchConfig, spec: RunSpec, initial_peers: list[str], index: int, save: Path) -> list[str]:
    threads = config.threads * (config.peers if spec.peers == 1 else 1)
    argv = cli("convforever.peer.cli") + config.recipe_args() + [
        "--initial-peers", *initial_peers, "--min-peers", str(spec.peers), "--threads", str(threads),
        "--compression", spec.mode, "--seed", str(config.seed + index), "--save-on-exit", str(save),
    ]
    if spec.rank is not None:
        argv += ["--rank", str(spec.rank)]
    if spec.mode.startswith("powersgd"):  # always explicit: the peer's default warm-up is not 0
        argv += ["--powersgd-warmup", str(spec.warmup)]
    if spec.layout:
        argv += ["--powersgd-layout", spec.layout]
    if spec.whole:
        argv += ["--whole-codec", spec.whole]
    return argv


def run_dir_of(config: BenchConfig, spec: RunSpec) -> Path:
    return config.workdir / "runs" / spec.name.replace(":", "-r").replace("/", "-")


def run_swarm(config: BenchConfig, spec: RunSpec, train_dir: Path) -> tuple[float, list[Path], LineLog, str]:
    """Coordinator + peers until every peer has left at --max-steps; (wall s, saved dirs, output, error)."""
    run_dir = run_dir_of(config, spec)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh ledger and no earlier weights to evaluate by mistake
    run_dir.mkdir(parents=True)
    log = LineLog(run_dir / "output.log")
    saves = [run_dir / f"peer-{i + 1}" for i in range(spec.peers)]
    peers: list[Process] = []
    started, error = time.monotonic(), ""
    coordinator, initial_peers = start_coordinator(config, train_dir, run_dir, log)
    try:
        peers = [Process(f"peer-{i + 1}", peer_argv(config, spec, initial_peers, i, save), log=log)
                 for i, save in enumerate(saves)]
        error = wait_for_peers(peers, coordinator, started + config.run_timeout)
    finally:
        for process in peers:
            process.stop()
        coordinator.stop()
        log.close()
    return time.monotonic() - started, saves, log, error


def wait_for_peers(peers: list[Process], coordinator: Process, deadline: float) -> str:
    """'' once every peer exited cleanly; else what went wrong (the caller stops whatever still runs)."""
    while any(p.popen.poll() is None for p in peers):
        failed = [p.name for p in peers if p.popen.poll() not in (None, 0)]
        if failed:
            return f"{', '.join(failed)} exited with an error"
        if coordinator.popen.poll() is not None:
            return "the coordinator stopped early"
        if time.monotonic() > deadline:
            return "timed out"
        time.sleep(0.5)
    failed = [p.name for p in peers if p.popen.returncode != 0]
    return f"{', '.join(failed)} exited with an error" if failed else ""


def evaluate(save: Path, test_file: Path) -> tuple[float, float, int]:
    """(top-1, top-5, step) of a peer's saved weights on the test split, through convforever-eval."""
    # One torch thread: the eval CLI has no --threads, and on a loaded box its default (every core) spent minutes
    # spinning in the kernel for 10 s of work.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cli("convforever.peer.evaluate") + [
        "--checkpoint", str(save), "--data", str(test_file), "--batch-size", "250", "--num-workers", "1",
    ], capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"convforever-eval on {save} failed: {result.stderr.strip()[-500:]}")
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    return scores["top1"], scores["top5"], int(scores["checkpoint_step"])


# ------------------------------------------------------------------------------------------------ parsing

PROGRESS = re.compile(r"^step (\d+) \| loss ([\d.]+|-) .*?\(last group (\d+)\)")
PER_ROUND = re.compile(r"\| ([\d.]+) (B|kB|MB|GB)/round, (\d+)x vs fp32")
GROUPS = re.compile(r"all-reduce group sizes: (\{.*?\})")
UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def parse_peer(lines: list[str]) -> PeerOutcome:
    """The final loss, bytes/round and ratio from the last progress lines; group sizes from the leaving line."""
    outcome = PeerOutcome()
    for line in lines:
        if match := PROGRESS.search(line):
            outcome.step = int(match.group(1))
            if match.group(2) != "-":
                outcome.loss = float(match.group(2))
        if match := PER_ROUND.search(line):
            outcome.bytes_per_round = float(match.group(1)) * UNITS[match.group(2)]
            outcome.ratio_vs_fp32 = float(match.group(3))
        if match := GROUPS.search(line):
            outcome.group_sizes = json.loads(match.group(1))
    return outcome


# ------------------------------------------------------------------------------------------------- report


def run_one(config: BenchConfig, spec: RunSpec, train_dir: Path, test_file: Path, pool: Executor,
            deadline: Optional[datetime.datetime] = None) -> Future:
    """Train now, evaluate in ``pool``: scoring the saved weights overlaps the next run's training, minutes per
    run on a busy box. The future's result is the run's RunResult."""
    cache = run_dir_of(config, spec) / "result.json"
    if config.reuse and cache.is_file():
        cached = json.loads(cache.read_text())
        if cached["fingerprint"] == json.loads(json.dumps(config.fingerprint(spec), default=str)):
            print(f"[convergence] {spec.name}: reusing the result of {cached['result']['finished']}", flush=True)
            done: Future = Future()
            done.set_result(RunResult.from_dict(cached["result"]))
            return done
    if deadline is not None and datetime.datetime.now(datetime.timezone.utc) > deadline:
        print(f"[convergence] {spec.name}: not run, past --deadline {deadline:%H:%M}", flush=True)
        return _skipped(spec, f"not run: past --deadline {deadline:%H:%M}")
    print(f"[convergence] {_now()} {spec.name}: {spec.peers} peer(s), --compression {spec.mode}"
          + (f" --rank {spec.rank}" if spec.rank else "") + f", {config.steps} steps", flush=True)
    wall, saves, log, error = run_swarm(config, spec, train_dir)
    outcomes = [parse_peer(log.of(f"peer-{i + 1}")) for i in range(len(saves))]
    result = RunResult(spec, wall, outcomes, error, _now())
    print(f"[convergence] {_now()} {spec.name}: trained in {wall:.0f}s, loss {result.loss:.4f}, all-reduce group "
          f"sizes {[o.group_sizes for o in outcomes]}" + (f", ERROR: {error}" if error else ""), flush=True)
    return pool.submit(score, config, result, saves, test_file, cache)


def score(config: BenchConfig, result: RunResult, saves: list[Path], test_file: Path, cache: Path) -> RunResult:
    """Evaluate every peer's saved weights, then cache the finished result (failed runs are never cached)."""
    for outcome, save in zip(result.peers, saves, strict=True):
        if not (save / "latest").exists():
            continue
        try:
            outcome.top1, outcome.top5, outcome.step = evaluate(save, test_file)
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # one failed score must not cost the whole table
            result.error = result.error or f"evaluation failed: {e}"
    if not result.error:
        cache.write_text(json.dumps({"fingerprint": config.fingerprint(result.spec), "result": asdict(result)},
                                    default=str))
    print(f"[convergence] {_now()} {result.spec.name}: top-1 {result.top1:.4f} "
          f"(per peer {[round(p.top1, 4) for p in result.peers]})", flush=True)
    return result


def _skipped(spec: RunSpec, why: str) -> Future:
    done: Future = Future()
    done.set_result(RunResult(spec, 0.0, [], why))
    return done


def _utc_today(text: str) -> datetime.datetime:
    """``HH:MM`` -> today at that UTC time (argparse type)."""
    hour, minute = map(int, text.split(":"))
    return datetime.datetime.now(datetime.timezone.utc).replace(hour=hour, minute=minute, second=0, microsecond=0)


def _now() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}"


def _fmt(value: float, pattern: str) -> str:
    return pattern.format(value) if math.isfinite(value) else "-"


def table(results: list[RunResult]) -> str:
    """Markdown table; deltas are against the baseline row when there is one."""
    base = next((r.top1 for r in results if r.spec.name == BASELINE), math.nan)
    rows = ["| run | peers | mode | rank | top-1 (%) | per peer | Δ vs baseline (points) | final train loss | "
            "group sizes (size: steps) | sent per round per peer | vs fp32 | wall (s) | ended (UTC) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        per_peer = " / ".join(_fmt(100 * p.top1, "{:.2f}") for p in r.peers)
        groups = " / ".join(", ".join(f"{k}: {v}" for k, v in sorted(p.group_sizes.items())) or "-" for p in r.peers)
        sent = max((p.bytes_per_round for p in r.peers if math.isfinite(p.bytes_per_round)), default=math.nan)
        ratio = min((p.ratio_vs_fp32 for p in r.peers if math.isfinite(p.ratio_vs_fp32)), default=math.nan)
        delta = 100 * (r.top1 - base) if r.spec.name != BASELINE else math.nan
        rows.append(" | ".join([
            f"| {r.spec.name}" + (f" ({r.error})" if r.error else ""), str(r.spec.peers),
            r.spec.mode if r.spec.name != BASELINE else "(alone: no averaging)", str(r.spec.rank or "-"),
            _fmt(100 * r.top1, "{:.2f}"), per_peer, _fmt(delta, "{:+.2f}"), _fmt(r.loss, "{:.4f}"), groups,
            _fmt(sent / 1e6, "{:.3f} MB"), _fmt(ratio, "{:.0f}x"), f"{r.wall_s:.0f}", f"{r.finished} |",
        ]))
    return "\n".join(rows)


def results_section(config: BenchConfig, results: list[RunResult], argv: list[str], compression_note: str) -> str:
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items() if k not in ("append", "reuse")}
    return "\n".join([
        f"## Convergence parity on MNIST ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python bench/convergence.py {' '.join(argv)}` on {platform.node()} ({os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}). {compression_note}",
        "",
        f"{config.model} at {config.image_size} px, {config.steps} global steps of {config.target_batch_size} "
        f"samples ({config.steps * config.target_batch_size} samples, "
        f"{config.steps * config.target_batch_size / 60000:.2f} passes over the 60,000 training images), local "
        f"batch {config.batch_size}, AdamW lr {config.lr} (warm-up {config.warmup_steps}, cosine to {config.min_lr}), "
        f"weight decay {config.weight_decay}, `--no-augment --no-ema`; training shards leased by a coordinator "
        f"(disjoint per peer); top-1 of each peer's final weights on the 10,000 MNIST test images (the run's figure "
        f"is the peers' mean). The baseline is one peer with the whole swarm's cores (`--threads "
        f"{config.threads * config.peers}`), which never averages; swarm peers have `--threads {config.threads}`. "
        "Group sizes are each peer's count of global steps per all-reduce group size (1: it stepped alone). Bytes "
        f"and the ratio are the peers' own progress-line figures for {config.model}'s gradients (ConvNeXt-T's are "
        "measured by bench/compression.py). The `none` row's delta is the comparison's own noise (exact averaging).",
        "",
        "Hyperparameters: `" + json.dumps(settings) + "`",
        "",
        table(results),
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="bench/convergence.py", description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=d.modes, help="baseline and/or MODE[:RANK] (default: %(default)s)")
    for name, value in asdict(d).items():
        if name in ("modes", "append", "reuse"):
            continue
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--no-append", action="store_true", help="print the table only, leave bench/RESULTS.md alone")
    p.add_argument("--reuse", action="store_true", help="take runs with the same settings from their result.json")
    p.add_argument("--note", default="", help="a sentence for RESULTS.md (e.g. which compression code ran)")
    p.add_argument("--deadline", type=_utc_today, metavar="HH:MM",
                   help="start no run after this UTC time; the table lists the runs left out")
    args = vars(p.parse_args(argv))
    append, note, deadline = not args.pop("no_append"), args.pop("note"), args.pop("deadline")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = BenchConfig(**args, append=append)
    # The files are shuffled with a fixed seed: --seed varies the peers' data order over the same shards, and a
    # work dir's cached files never depend on which --seed converted them.
    train_dir, test_file = prepare_mnist(config.mnist, config.workdir / "data", 0, config.row_group_rows)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [run_one(config, parse_mode(spec, config.peers), train_dir, test_file, pool, deadline) for spec in config.modes]
        results = [future.result() for future in futures]
    section = results_section(config, results, argv, note)
    print(section, flush=True)
    if config.append:
        append_results(section)


if __name__ == "__main__":
    main()
