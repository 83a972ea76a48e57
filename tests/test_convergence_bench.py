"""bench/convergence.py's data step: MNIST arrays become parquet that the peers' loader and the coordinator's
planner read as they are, with every label and pixel intact, and its mode specs fail early when mistyped.

Uses a few synthetic digits, not the real MNIST file (kept outside the repository)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convforever.data import DataConfig, make_loader
from convforever.data.images import eval_transform, normalize
from convforever.data.shards import plan_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from convergence import BenchConfig, parse_mode, prepare_mnist  # noqa: E402


def _fake_mnist(path: Path, train: int, test: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(train + test, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=train + test).astype(np.uint8)
    np.savez(path, x_train=x[:train], y_train=y[:train], x_test=x[train:], y_test=y[train:])
    return x[train:], y[train:]


def test_mnist_parquet_reads_back_through_the_loader(tmp_path):
    x_test, y_test = _fake_mnist(tmp_path / "mnist.npz", train=40, test=12)
    train_dir, test_file = prepare_mnist(tmp_path / "mnist.npz", tmp_path / "out", seed=0, row_group_rows=10)

    plan = plan_dataset(str(train_dir), shard_rows=20)
    assert plan.num_rows == 40 and len(plan.shards) == 2  # row groups of 10 rows, cut into shards of 20

    # The test split in file order, each image exactly what the eval transform makes of the original array
    # (PNG is lossless), so the benchmark's accuracy is measured on MNIST's own pixels and labels.
    config = DataConfig(files=str(test_file), image_size=32, batch_size=5, train=False, num_classes=50)
    batches = list(make_loader(config))
    assert torch.cat([b.labels for b in batches]).tolist() == y_test.tolist()
    assert sum(sum(b.skipped.values()) for b in batches) == 0
    expected = normalize(torch.stack([eval_transform(Image.fromarray(x).convert("RGB"), 32) for x in x_test]))
    assert torch.equal(torch.cat([b.images for b in batches]), expected)

    # A second call reuses the files rather than converting again.
    mtime = test_file.stat().st_mtime_ns
    prepare_mnist(tmp_path / "mnist.npz", tmp_path / "out", seed=0, row_group_rows=10)
    assert test_file.stat().st_mtime_ns == mtime


def test_mode_specs():
    assert parse_mode("baseline").peers == 1 and parse_mode("baseline").mode == "none"
    assert parse_mode("powersgd-8bit:2").rank == 2 and parse_mode("powersgd").rank == 4
    with pytest.raises(ValueError, match="only PowerSGD"):
        parse_mode("fp16:2")
    warm = parse_mode("powersgd-8bit:4+w10")
    assert (warm.mode, warm.rank, warm.warmup) == ("powersgd-8bit", 4, 10) and parse_mode("powersgd").warmup == 0
    with pytest.raises(ValueError, match="warm-up"):
        parse_mode("8bit+w5")
    flat = parse_mode("powersgd-8bit:1+w10@flat")
    assert (flat.rank, flat.warmup, flat.layout) == (1, 10, "flat") and parse_mode("powersgd").layout is None
    with pytest.raises(ValueError, match="LAYOUT"):
        parse_mode("powersgd@diagonal")
    eight = parse_mode("powersgd-8bit:2+w10@flat/8bit")
    assert (eight.rank, eight.layout, eight.whole) == (2, "flat", "8bit") and flat.whole is None
    for bad in ("powersgd-8bit:2@flat/int4", "powersgd-8bit:2@per-tensor/8bit"):
        with pytest.raises(ValueError, match="WHOLE"):
            parse_mode(bad)
    with pytest.raises(ValueError, match="one of"):
        BenchConfig(modes=["int4"])
