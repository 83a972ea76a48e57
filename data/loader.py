"""Parquet rows -> labelled, augmented batches, through a torch DataLoader.

Workers build whole batches themselves (DataLoader ``batch_size=None``): each worker owns a disjoint,
fixed share of the (file, row group) units, labels rows from their captions, decodes and transforms them,
and attaches to every batch the rows it skipped since its previous batch. The main process sums those
counts, normalises, and tracks passes. Holding back one batch in the main process lets skips that a
worker reports after its last real batch still reach the caller.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypedDict

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .images import UnusableImage, decode_image, decode_min_side, eval_transform, normalize, train_transform
from .labels import classify_caption, label_from_value
from .parquet import Unit, iter_rows, list_units, resolve_files

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the shards are and how to turn them into batches.

    ``min_crop_scale``: the smallest crop area fraction of the random resized crop. ImageNet recipes use
    0.08 at 224 px; at 32-64 px such crops are a few source pixels wide, so the default is a milder 0.35.
    ``max_image_pixels``: images whose header claims more pixels are skipped as "too_large" before
    decoding; raise it only if workers have memory for ``3 * max_image_pixels`` bytes each.
    """

    files: str | list[str]
    image_size: int = 64
    batch_size: int = 16
    train: bool = True
    num_workers: int = 0
    seed: int = 0
    shuffle_buffer: int = 256
    min_crop_scale: float = 0.35
    max_image_pixels: int = 64_000_000

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size}: use at least 8 pixels")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be at least 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers}: use 0 (load in this process) or more")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer}: use 0 or 1 to disable, more to shuffle")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"min_crop_scale={self.min_crop_scale}: must be in (0, 1]")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels={self.max_image_pixels}: must be positive")


@dataclass
class Batch:
    """Normalised images, labels, and what was dropped on the way (summed by the caller)."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)
    passes: int = 0


class _WorkerBatch(TypedDict):
    images: torch.Tensor  # uint8 (B, 3, S, S); B may be 0 when only skips are reported
    labels: torch.Tensor
    skipped: dict[str, int]
    worker: int
    passes: int
    exhausted: bool  # this worker's share has no usable row: it stopped


class _RowStream(IterableDataset):
    """Yields _WorkerBatch dicts from this worker's share of the units."""

    def __init__(self, units: list[Unit], config: DataConfig) -> None:
        super().__init__()
        self.units = units
        self.config = config

    def __iter__(self) -> Iterator[_WorkerBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cfg = self.config
        if cfg.train:
            # A fixed share per worker for the whole run (so "this share has nothing usable" is final),
            # drawn from a seed-dependent order so peers with different seeds split files differently.
            order = list(self.units)
            random.Random(f"units:{cfg.seed}").shuffle(order)
            share = order[worker::num_workers]
        else:
            share = self.units[worker::num_workers]
        if share:
            yield from _WorkerState(share, cfg, worker).batches()


class _WorkerState:
    """One worker's reading loop: passes over its share, shuffle buffer, batching, skip counters."""

    def __init__(self, share: list[Unit], config: DataConfig, worker: int) -> None:
        self.share = share
        self.config = config
        self.worker = worker
        # String seeds hash deterministically (unlike hash() of a tuple across processes).
        self.rng = random.Random(f"stream:{config.seed}:{worker}")
        self.skipped: Counter[str] = Counter()
        self.passes = 0
        self.min_side = decode_min_side(config.image_size, config.train, config.min_crop_scale)

    def batches(self) -> Iterator[_WorkerBatch]:
        cfg = self.config
        images: list[torch.Tensor] = []
        labels: list[int] = []
        while True:
            produced = 0
            for image, label in self._pass_samples():
                produced += 1
                images.append(image)
                labels.append(label)
                if len(images) == cfg.batch_size:
                    yield self._batch(images, labels, exhausted=False)
                    images, labels = [], []
            self.passes += 1
            exhausted = produced == 0
            if not cfg.train or exhausted:
                if exhausted:
                    logger.warning("worker %d: no usable row in its %d row groups (skipped %s); it stops",
                                   self.worker, len(self.share), dict(self.skipped))
                if images or self.skipped or exhausted:
                    yield self._batch(images, labels, exhausted=exhausted)
                return

    def _batch(self, images: list[torch.Tensor], labels: list[int], *, exhausted: bool) -> _WorkerBatch:
        size = self.config.image_size
        stacked = torch.stack(images) if images else torch.empty((0, 3, size, size), dtype=torch.uint8)
        skipped, self.skipped = dict(self.skipped), Counter()
        return _WorkerBatch(images=stacked, labels=torch.tensor(labels, dtype=torch.int64), skipped=skipped,
                            worker=self.worker, passes=self.passes, exhausted=exhausted)

    def _pass_samples(self) -> Iterator[tuple[torch.Tensor, int]]:
        """One pass over the share: train = shuffled units through a shuffle buffer; eval = in order."""
        cfg = self.config
        units = list(self.share)
        if not cfg.train:
            for row_id, label, data in self._labelled_rows(units):
                sample = self._sample(row_id, label, data)
                if sample is not None:
                    yield sample
            return
        self.rng.shuffle(units)
        buffer: list[tuple[str | None, int, bytes | None]] = []
        for row in self._labelled_rows(units):
            buffer.append(row)
            if len(buffer) >= max(cfg.shuffle_buffer, 1):
                sample = self._sample(*self._pop_random(buffer))
                if sample is not None:
                    yield sample
        # Drain at the pass boundary so each pass is a complete permutation of the share (and a share
        # smaller than the buffer still yields).
        while buffer:
            sample = self._sample(*self._pop_random(buffer))
            if sample is not None:
                yield sample

    def _pop_random(self, buffer: list) -> tuple:
        i = self.rng.randrange(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        return buffer.pop()

    def _labelled_rows(self, units: list[Unit]) -> Iterator[tuple[str | None, int, bytes | None]]:
        """(id, label, image bytes) of rows with a usable label; others are counted and dropped here,
        before they take shuffle-buffer space or decode time."""
        for unit in units:
            for row_id, caption, label_cell, data in iter_rows(unit):
                if not _is_missing(label_cell):
                    label = label_from_value(label_cell)
                    if label is None:
                        self._skip("bad_label", row_id, f"label {label_cell!r}")
                        continue
                else:
                    label = classify_caption(caption)
                    if label is None:
                        self._skip("no_label", row_id, f"caption {caption!r}")
                        continue
                yield row_id, label, data

    def _sample(self, row_id: str | None, label: int, data: bytes | None) -> tuple[torch.Tensor, int] | None:
        cfg = self.config
        try:
            image = decode_image(data, max_pixels=cfg.max_image_pixels, min_side=self.min_side)
        except UnusableImage as error:
            self._skip(error.reason, row_id, str(error))
            return None
        if cfg.train:
            tensor = train_transform(image, cfg.image_size, self.rng, scale=(cfg.min_crop_scale, 1.0))
        else:
            tensor = eval_transform(image, cfg.image_size)
        return tensor, label

    def _skip(self, reason: str, row_id: str | None, detail: str) -> None:
        self.skipped[reason] += 1
        logger.debug("skipping row %s (%s)", row_id, detail)


def _is_missing(cell: object) -> bool:
    """A null label cell means "use the caption"; NaN is how pandas writes a null int."""
    return cell is None or (isinstance(cell, float) and math.isnan(cell))


def make_loader(config: DataConfig) -> Iterator[Batch]:
    """Batches from ``config.files``: endless shuffled passes when training, one ordered pass otherwise.

    Files are resolved and their schemas checked here, so a wrong path or schema fails on this call
    rather than inside a worker.
    """
    files = resolve_files(config.files)
    units = list_units(files)
    if not units:
        raise ValueError(f"the {len(files)} parquet files for {config.files!r} contain no rows")
    logger.info("data: %d files, %d row groups, %d rows (%s, %d workers)", len(files), len(units),
                sum(u.num_rows for u in units), "train" if config.train else "eval", config.num_workers)
    loader = DataLoader(_RowStream(units, config), batch_size=None, num_workers=config.num_workers,
                        persistent_workers=False)
    active_workers = min(max(config.num_workers, 1), len(units))
    return _assemble(loader, config, active_workers)


def _assemble(loader: DataLoader, config: DataConfig, active_workers: int) -> Iterator[Batch]:
    # passes are complete when every worker still reading has finished its share of them.
    worker_passes = {w: 0 for w in range(active_workers)}
    skipped: Counter[str] = Counter()
    pending: Batch | None = None
    for item in loader:
        skipped.update(item["skipped"])
        if item["exhausted"]:
            worker_passes.pop(item["worker"], None)
        elif item["worker"] in worker_passes:
            worker_passes[item["worker"]] = item["passes"]
        if item["images"].shape[0] == 0:
            continue
        if pending is not None:
            yield pending
        pending = Batch(images=normalize(item["images"]), labels=item["labels"], skipped=dict(skipped),
                        passes=min(worker_passes.values(), default=item["passes"]))
        skipped = Counter()
    if pending is not None:
        pending.skipped = dict(Counter(pending.skipped) + skipped)
        yield pending
    elif config.train:
        raise RuntimeError(f"no usable rows in {config.files!r}: every row was skipped ({dict(skipped)}); "
                           "check that captions name a category or add a 'label' column")
    else:
        logger.warning("eval data %r has no usable rows (skipped %s)", config.files, dict(skipped))
