"""Bytes on the wire per gradient-averaging round for every compression mode, on ConvNeXt-T gradients.

Two peers on 127.0.0.1, each its own process with its own DHT, average real ConvNeXt-T gradients (random 64x64
images, so the run fits a laptop CPU; gradient shapes are those of 224x224 training) for a few rounds per mode. Prints
the measured table, a per-tensor breakdown of what PowerSGD sends, and what one state-averaging round costs, and
appends them to bench/RESULTS.md.

    python bench/compression.py [--rounds 3] [--rank 4] [--no-append]
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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from hivemind.compression import CompressionInfo, NoCompression
from hivemind.utils.math import get_flatten_greedy_dims

from convforever.compression import MODES, CompressionConfig, fp32_bytes, gradient_codec, state_codec
from convforever.compression.loopback import STATE_MODE, ModeResult, PairSpec, run_pair
from convforever.model import ModelConfig, create_model
from results import append_results  # noqa: E402  (bench/ is on sys.path when run as a script)

logger = logging.getLogger("bench.compression")
RESULTS = Path(__file__).with_name("RESULTS.md")
IMAGE_SIZE, BATCH = 64, 4
POWERSGD_MIN_COMPRESSION_RATIO = 0.5  # hivemind's default, which the Optimizer's factory call leaves in place


@lru_cache(maxsize=1)
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(name="convnext_tiny", num_classes=1000))


def convnext_shapes() -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in _model().parameters()]


@lru_cache(maxsize=8)
def convnext_grads(peer: int, round_index: int) -> tuple[torch.Tensor, ...]:
    """Gradients of one small batch; cached because each peer also needs the other's to know the exact mean."""
    model = _model()
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(1000 * peer + round_index)
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, 1000, (BATCH,), generator=generator)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    return tuple(p.grad.detach().clone() for p in model.parameters())


@dataclass
class Breakdown:
    """Encoded bytes of one full copy of what a mode all-reduces, split by where the bytes go."""

    factor_values: int = 0
    factor_bytes: int = 0
    factor_messages: int = 0
    whole_values: int = 0
    whole_bytes: int = 0
    whole_messages: int = 0
    whole_tensors: int = 0

    @property
    def total_bytes(self) -> int:
        return self.factor_bytes + self.whole_bytes


def _encoded_bytes(codec, shape: tuple[int, ...]) -> int:
    tensor = torch.randn(shape)
    return codec.compress(tensor, CompressionInfo.from_tensor(tensor)).ByteSize()


def powersgd_breakdown(shapes: list[tuple[int, ...]], config: CompressionConfig) -> Breakdown:
    """Mirror hivemind's PowerSGD split: 1-D tensors and poorly compressible ones travel whole, the rest as P and Q."""
    codec, result = gradient_codec(config), Breakdown()
    for shape in shapes:
        numel, dims = math.prod(shape), get_flatten_greedy_dims(torch.empty(shape))
        whole = len(shape) <= 1 or 1 - config.rank * sum(dims) / numel < POWERSGD_MIN_COMPRESSION_RATIO
        if whole:
            result.whole_values += numel
            result.whole_bytes += _encoded_bytes(codec, (numel,))
            result.whole_messages += 1
            result.whole_tensors += 1
            continue
        for rows in dims:  # P is (m, r), Q is (n, r)
            result.factor_values += rows * config.rank
            result.factor_bytes += _encoded_bytes(codec, (rows * config.rank,))
            result.factor_messages += 1
    return result


def state_round_bytes(shapes: list[tuple[int, ...]], state_compression: str) -> int:
    """Bytes one peer of a pair sends in one state-averaging round of the parameters (one encoded copy)."""
    codec = NoCompression() if state_compression == "none" else state_codec(
        CompressionConfig(state_compression=state_compression))
    return sum(_encoded_bytes(codec, (math.prod(shape),)) for shape in shapes)


def _mb(value: float) -> str:
    return f"{value / 1e6:.3f}"


def measured_table(results: list[ModeResult]) -> list[str]:
    by_mode = {r.mode: r for r in results if r.peer == 0}
    fp32_sent = by_mode["none"].snapshot.bytes_per_round_sent
    lines = [
        "| mode | sent MB/round/peer | received MB/round/peer | x vs fp32 (measured) | x vs fp32 (counter) "
        "| parts sent/round | max abs err | rel L2 err | rel L2 err of the sum over rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        result = by_mode[mode]
        s = result.snapshot
        lines.append(
            f"| {mode} | {_mb(s.bytes_per_round_sent)} | {_mb(s.bytes_per_round_received)} "
            f"| {fp32_sent / s.bytes_per_round_sent:.1f} | {s.ratio_vs_fp32:.1f} | {s.grad_parts_sent / s.grad_rounds:.0f} "
            f"| {result.max_abs_error:.2e} | {result.rel_l2_error:.3f} | {result.extra['cumulative_rel_l2']:.3f} |"
        )
    return lines


def breakdown_table(shapes: list[tuple[int, ...]], rank: int) -> list[str]:
    lines = [
        "| mode | P/Q factors: values / MB / messages | whole tensors: count / values / MB | encoded copy MB |",
        "|---|---|---|---:|",
    ]
    for mode in ("powersgd", "powersgd-8bit"):
        b = powersgd_breakdown(shapes, CompressionConfig(mode=mode, rank=rank))
        lines.append(
            f"| {mode} | {b.factor_values:,} / {_mb(b.factor_bytes)} / {b.factor_messages} "
            f"| {b.whole_tensors} / {b.whole_values:,} / {_mb(b.whole_bytes)} | {_mb(b.total_bytes)} |"
        )
    return lines


def state_table(shapes: list[tuple[int, ...]], results: list[ModeResult]) -> list[str]:
    live = sum(r.snapshot.state_bytes_sent for r in results if r.mode == STATE_MODE)
    lines = ["| state codec | MB/round/peer (pair) | MB/round/peer (large group, ~2x) |", "|---|---:|---:|"]
    for name in ("none", "fp16", "8bit"):
        size = state_round_bytes(shapes, name)
        lines.append(f"| {name} | {_mb(size)} | {_mb(2 * size)} |")
    lines.append(f"\nLive check: the two peers' sender halves of one fp16 state round summed to {_mb(live)} MB.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    shapes = convnext_shapes()
    payload = fp32_bytes(torch.empty(shape) for shape in shapes)
    started = time.monotonic()
    spec = PairSpec(modes=MODES + (STATE_MODE,), shapes=shapes, grads_fn=convnext_grads, rounds=args.rounds,
                    rank=args.rank, min_matchmaking_time=1.0, step_timeout=120, run_id="bench_compression",
                    log_level=logging.INFO if args.verbose else logging.WARNING)
    results = run_pair(spec, timeout=600)
    elapsed = time.monotonic() - started

    command = " ".join(["python", "bench/compression.py", *sys.argv[1:]])
    report = [
        f"## {datetime.date.today().isoformat()} — gradient compression, ConvNeXt-T, 2 peers",
        "",
        f"- command: `{command}`",
        f"- machine: {os.cpu_count()}-core CPU, loopback ({platform.machine()}, torch {torch.__version__})",
        f"- {len(shapes)} tensors, {payload // 4:,} values, fp32 copy {_mb(payload)} MB; {args.rounds} rounds per mode, "
        f"PowerSGD rank {args.rank}; errors are the last round's, vs the exact mean; run took {elapsed:.0f} s",
        "",
        *measured_table(results),
        "",
        "What PowerSGD puts in one encoded copy (a pair sends about one copy per round per peer):",
        "",
        *breakdown_table(shapes, args.rank),
        "",
        "One state-averaging round (all parameters; `average_state_every=1`, the Optimizer default, pays it every "
        "epoch):",
        "",
        *state_table(shapes, results),
        "",
    ]
    print("\n".join(report))
    if not args.no_append:
        append_results("\n".join(report))


if __name__ == "__main__":
    main()
