"""Bytes on the wire per gradient-averaging round for every compression mode, on ConvNeXt-T gradients.

Groups of 2 and of 4 peers on 127.0.0.1, each peer its own process with its own DHT, average real ConvNeXt-T gradients
(random 64x64 images, so the run fits a laptop CPU; gradient shapes are those of 224x224 training) for a few rounds
per mode: fp32, fp16, 8-bit, and PowerSGD at ranks 1/2/4/8 with fp32 factors, with 8-bit factors (the tensors
PowerSGD leaves whole as scaled fp16 or as 8-bit), and once in hivemind's own per-tensor layout to measure what the
flat layout gains. Prints one table per group size, what one state-averaging round costs, and appends them to
bench/RESULTS.md. Long (minutes per group size); progress goes to stderr.

    python bench/compression.py [--rounds 3] [--peers 2 4] [--batch 3] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import platform
import sys
import time
from functools import lru_cache, partial
from pathlib import Path
from typing import Optional, Sequence

import torch
from hivemind.compression import CompressionInfo, NoCompression
from results import append_results  # noqa: E402  (bench/ is on sys.path when run as a script)

from convforever.compression import CompressionConfig, fp32_bytes, state_codec
from convforever.compression.loopback import STATE_MODE, GroupSpec, ModeResult, run_group
from convforever.model import ModelConfig, create_model

logger = logging.getLogger("bench.compression")
RESULTS = Path(__file__).with_name("RESULTS.md")
IMAGE_SIZE, BATCH = 64, 4
RANKS = (1, 2, 4, 8)
BEFORE_RANK = 4  # the per-tensor figure measured again in every run, to show the flat layout's gain


@lru_cache(maxsize=1)
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(name="convnext_tiny", num_classes=1000))


def convnext_shapes() -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in _model().parameters()]


def convnext_grads(peer: int, round_index: int) -> tuple[torch.Tensor, ...]:
    """Gradients of one small batch, different for every peer and round."""
    model = _model()
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(1000 * peer + round_index)
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, 1000, (BATCH,), generator=generator)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    return tuple(p.grad.detach().clone() for p in model.parameters())


def save_grads(folder: Path, peers: int, rounds: int) -> None:
    """Compute every (peer, round) gradient once, here, for all peer processes to map from disk.

    Each peer needs every groupmate's gradients for the exact mean; computing them in each of 4 processes costs
    4x the CPU, and holding them costs 114 MB each per process, on a box already short of both.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for peer in range(peers):
        for round_index in range(rounds):
            path = folder / f"{peer}_{round_index}.pt"
            if not path.exists():
                torch.save(convnext_grads(peer, round_index), path)


def load_grads(folder: Path, peer: int, round_index: int) -> tuple[torch.Tensor, ...]:
    """``grads_fn`` of the peer processes (bound with functools.partial): memory-mapped, so the page cache is shared."""
    return torch.load(folder / f"{peer}_{round_index}.pt", mmap=True)


def variants() -> list[tuple[str, CompressionConfig]]:
    """Every (label, config) measured per group size, cheapest first (the full-size modes move 114 MB a round).

    PowerSGD runs without warm-up: these are the bytes of its rounds (a warm-up round costs what ``8bit`` does).
    """
    runs = []
    for whole in ("fp16", "8bit"):
        runs += [(f"powersgd-8bit r{rank} whole={whole}", CompressionConfig(mode="powersgd-8bit", rank=rank,
                                                                              layout="flat", whole_codec=whole,
                                                                              warmup_steps=0))
                 for rank in RANKS]
    runs.append((f"powersgd-8bit r{BEFORE_RANK} per-tensor (before)",
                 CompressionConfig(mode="powersgd-8bit", rank=BEFORE_RANK, layout="per-tensor", warmup_steps=0)))
    runs += [(f"powersgd r{rank}", CompressionConfig(mode="powersgd", rank=rank, layout="flat", warmup_steps=0))
             for rank in RANKS]
    runs += [(mode, CompressionConfig(mode=mode)) for mode in ("none", "fp16", "8bit")]
    return runs


def _mb(value: float) -> str:
    return f"{value / 1e6:.3f}"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _subset_rel_l2(result: ModeResult, indices: Sequence[int]) -> float:
    err = sum(result.extra["cumulative_err_sq"][i] for i in indices)
    ref = sum(result.extra["cumulative_ref_sq"][i] for i in indices)
    return math.sqrt(err / ref) if ref > 0 else math.nan


def measured_table(results: list[ModeResult], labels: Sequence[str], one_d: Sequence[int]) -> list[str]:
    """One row per run: bytes and parts averaged over the group's peers, errors as peer 0 saw them."""
    by_label: dict[str, list[ModeResult]] = {}
    for result in results:
        by_label.setdefault(result.mode, []).append(result)
    fp32_sent = _mean([r.snapshot.bytes_per_round_sent for r in by_label["none"]]) if "none" in by_label else None
    lines = [
        "| mode | MB sent/round/peer | x vs fp32 (measured) | parts sent/round/peer | rel L2 err, last round "
        "| rel L2 err of the sum over rounds | same, 1-D tensors only |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        if label not in by_label:
            lines.append(f"| {label} | not measured (the run failed or timed out) | | | | | |")
            continue
        group = sorted(by_label[label], key=lambda r: r.peer)
        sent = _mean([r.snapshot.bytes_per_round_sent for r in group])
        parts = _mean([r.snapshot.grad_parts_sent / r.snapshot.grad_rounds for r in group])
        first = group[0]
        # without a measured fp32 row, the counters' butterfly reference for the same rounds (marked)
        ratio = f"{fp32_sent / sent:.1f}" if fp32_sent else f"{_mean([r.snapshot.ratio_vs_fp32 for r in group]):.1f}*"
        lines.append(
            f"| {label} | {_mb(sent)} | {ratio} | {parts:.1f} | {first.rel_l2_error:.3f} "
            f"| {first.extra['cumulative_rel_l2']:.3f} | {_subset_rel_l2(first, one_d):.4f} |"
        )
    return lines


def _encoded_bytes(codec, numel: int) -> int:
    tensor = torch.randn(numel)
    return codec.compress(tensor, CompressionInfo.from_tensor(tensor)).ByteSize()


def state_table(shapes: list[tuple[int, ...]], results: list[ModeResult]) -> list[str]:
    """One encoded copy per codec; a peer of n sends 2 (n - 1) / n copies per butterfly round."""
    lines = ["| state codec | MB/round/peer, 2 peers | 4 peers | large group (~2x) |", "|---|---:|---:|---:|"]
    for name in ("none", "fp16", "8bit"):
        codec = NoCompression() if name == "none" else state_codec(CompressionConfig(state_compression=name))
        size = sum(_encoded_bytes(codec, math.prod(shape)) for shape in shapes)
        lines.append(f"| {name} | {_mb(size)} | {_mb(1.5 * size)} | {_mb(2 * size)} |")
    live = sum(r.snapshot.state_bytes_sent for r in results if r.mode == STATE_MODE)
    if live:
        lines.append(f"\nLive check: the two peers' sender halves of one fp16 state round summed to {_mb(live)} MB.")
    return lines


def _progress(result: ModeResult) -> None:
    s = result.snapshot
    print(f"  {time.strftime('%H:%M:%S')} peer {result.peer}: {result.mode}: {_mb(s.bytes_per_round_sent)} MB/round "
          f"sent, cumulative rel L2 {result.extra.get('cumulative_rel_l2', result.rel_l2_error):.3f}",
          file=sys.stderr, flush=True)


def measure_group(peers: int, runs: list[tuple[str, CompressionConfig]], shapes: list[tuple[int, ...]],
                  args: argparse.Namespace, with_state: bool) -> list[ModeResult]:
    """All runs for one group size, ``args.batch`` runs per set of peer processes (each run's averager is closed when
    it is done, so memory stays at about one run's buffers per peer)."""
    results: list[ModeResult] = []
    batches = [runs[i:i + args.batch] for i in range(0, len(runs), args.batch)]
    for number, batch in enumerate(batches):
        modes = (STATE_MODE,) if with_state and number == len(batches) - 1 else ()
        print(f"{time.strftime('%H:%M:%S')} {peers} peers, batch {number + 1}/{len(batches)}: "
              f"{', '.join(label for label, _ in batch)}{' + state' if modes else ''}", file=sys.stderr, flush=True)
        spec = GroupSpec(modes=modes, variants=batch, shapes=shapes, grads_fn=partial(load_grads, args.grads_dir),
                         rounds=args.rounds, close_each_run=True,
                         peers=peers, min_matchmaking_time=1.0 + 0.5 * peers, step_timeout=300,
                         run_id=f"bench_compression_{peers}_{number}",
                         log_level=logging.INFO if args.verbose else logging.WARNING)
        try:
            results += run_group(spec, timeout=600 + 300 * len(batch), on_result=_progress)
        except (RuntimeError, TimeoutError) as error:  # a loaded box: report the rows that did finish
            print(f"  batch failed, its rows stay empty: {error}", file=sys.stderr, flush=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4], help="group sizes, one table each")
    parser.add_argument("--batch", type=int, default=8, help="runs per set of peer processes (one starts in minutes "
                        "on a loaded box; a failure loses the rest of its set)")
    parser.add_argument("--grads-dir", type=Path, default=Path("/tmp/convforever_bench_grads"),
                        help="where the gradients are computed once and mapped from by the peers")
    parser.add_argument("--only", nargs="*", default=None,
                        help="measure only runs whose label starts with one of these (none is always measured)")
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    shapes = convnext_shapes()
    print(f"{time.strftime('%H:%M:%S')} computing gradients for {max(args.peers)} peers x {args.rounds} rounds",
          file=sys.stderr, flush=True)
    save_grads(args.grads_dir, max(args.peers), args.rounds)
    one_d = [i for i, shape in enumerate(shapes) if len(shape) <= 1]
    payload = fp32_bytes(torch.empty(shape) for shape in shapes)
    runs = [(label, config) for label, config in variants()
            if label == "none" or args.only is None or any(label.startswith(prefix) for prefix in args.only)]
    labels = [label for label, _ in runs]
    started = time.monotonic()
    tables, state_results = [], []
    for peers in args.peers:
        group_started = time.monotonic()
        results = measure_group(peers, runs, shapes, args, with_state=peers == 2)
        state_results += [r for r in results if r.mode == STATE_MODE]
        tables += [f"### {peers} peers ({time.monotonic() - group_started:.0f} s)", "",
                   *measured_table([r for r in results if r.mode != STATE_MODE], labels, one_d), ""]
        print("\n".join(tables[-(len(labels) + 5):]), flush=True)  # each table as soon as it is measured
    elapsed = time.monotonic() - started

    command = " ".join(["python", "bench/compression.py", *(sys.argv[1:] if argv is None else argv)])
    report = [
        f"## {datetime.date.today().isoformat()} — gradient compression, ConvNeXt-T, flat PowerSGD layout, "
        f"{' and '.join(map(str, args.peers))} peers",
        "",
        f"- command: `{command}`",
        f"- machine: {os.cpu_count()}-core CPU, loopback ({platform.machine()}, torch {torch.__version__}); one torch "
        f"thread per peer process; run took {elapsed:.0f} s",
        f"- {len(shapes)} tensors ({len(one_d)} of them 1-D), {payload // 4:,} values, fp32 copy {_mb(payload)} MB; "
        f"{args.rounds} rounds per mode; errors vs the exact mean of the group's gradients: the last round's, and "
        "that of the sum over all rounds (what error feedback repays); 1-D tensors are never factorized, so their "
        "column is the cost of the whole-tensor codec",
        "- bytes are protobuf messages this peer sends (sender parts + reducer replies), averaged over the group's "
        "peers; `x vs fp32` divides the `none` row of the same table by each row (`*`: no `none` row, the counters' "
        "fp32 reference for the same rounds instead)",
        "- `whole=` is how the tensors PowerSGD leaves whole travel (scaled fp16 or blockwise 8-bit); `per-tensor` is "
        "hivemind's own layout (one message and codebook per tensor), measured again for the before/after ratio",
        "",
        *tables,
        "One state-averaging round (all parameters; `average_state_every=1`, the Optimizer default, pays it every "
        "epoch):",
        "",
        *state_table(shapes, state_results),
        "",
    ]
    print("\n".join(report))
    if not args.no_append:
        append_results("\n".join(report))


if __name__ == "__main__":
    main()
