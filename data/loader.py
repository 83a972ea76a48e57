"""Shards -> labelled, augmented batches, through a torch DataLoader.

Where shards come from is a `ShardSource`: the peer's own plan of local files (`LocalShards`), or the
coordinator's leases (``convforever.peer.leases``), which hand each shard to one peer per pass. Each
DataLoader worker is a consumer of its own: it takes a shard, streams its rows, labels them (label column,
``--labels`` dataset, or the caption classifier), downloads URL rows, decodes and transforms them through
a shuffle buffer, and builds whole batches itself (DataLoader ``batch_size=None``). Every batch carries
the rows skipped since the previous one, by reason. When a shard's last row is resolved the worker tells
the source how many rows it used and skipped, so the coordinator's ledger can close it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import RandAugment, parse_randaugment
from .fetch import FetchConfig, fetch_images
from .images import (
    UnusableImage,
    decode_image,
    decode_min_side,
    eval_transform,
    normalize,
    train_transform,
)
from .labels import NUM_CLASSES, classify_caption, label_from_value
from .shards import DatasetPlan, Row, Shard, ShardUnreadable, iter_shard, local_plan

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the data is and how to turn it into batches.

    ``files``: local data for `LocalShards` (a parquet/jsonl file, a directory, a glob, an ImageFolder,
    or a list of files); ignored when the caller passes its own ShardSource.
    ``min_crop_scale``: the smallest crop area fraction of the random resized crop. ImageNet recipes use
    0.08 at 224 px; at 32-64 px such crops are a few source pixels wide, so the default is a milder 0.35.
    ``max_image_pixels``: images whose header claims more pixels are skipped as "too_large" before
    decoding; raise it only if workers have memory for ``3 * max_image_pixels`` bytes each.
    ``labels``: a labels dataset (``id`` -> ``label``, e.g. from ``convforever-label``) that overrides the
    caption classifier for the ids it lists.
    ``randaugment``: a RandAugment string (``rand-m9-mstd0.5``, see ``augment.parse_randaugment``) applied
    in the workers after crop + flip when training; None: off. Off by default here so that plain loaders
    (evaluation, benchmarks, tests) stay crop + flip; the recipe's value is ``AugmentConfig().randaugment``,
    which the trainer passes on. The batch-level augmentations are not the loader's: see ``augment.py``.
    """

    files: str | list[str] = ""
    image_size: int = 64
    batch_size: int = 16
    train: bool = True
    num_workers: int = 0
    seed: int = 0
    shuffle_buffer: int = 256
    min_crop_scale: float = 0.35
    max_image_pixels: int = 64_000_000
    num_classes: int = NUM_CLASSES  # integer label cells must be below this (ImageNet-style data: 1000)
    shard_rows: int = 20_000  # local plans only: rows per shard
    labels: str | None = None
    pin_memory: bool = False  # pin batches in page-locked memory (set when training on CUDA)
    randaugment: str | None = None
    fetch: FetchConfig = field(default_factory=FetchConfig)

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
        if self.randaugment is not None:
            parse_randaugment(self.randaugment)  # a bad string fails here, not inside a worker


@dataclass
class Lease:
    """A shard to read: from the coordinator (``lease_id`` set) or from the peer's own plan."""

    shard: Shard
    root: str
    lease_id: str = ""
    start_row: int = 0  # resume point: rows a previous holder already trained on
    data_pass: int = 0  # which pass over the dataset this reading belongs to
    renew_every: float = 0.0  # seconds between renewals while its rows are read or wait in the buffer; 0: never


class ShardSource(Protocol):
    """Hands shards to DataLoader workers. It is pickled into each worker process, so it must hold no
    live connections before `acquire` is first called there."""

    def acquire(self, worker: int, num_workers: int) -> Lease | None:
        """The next shard for this worker (may block while retrying); None: there is no more data."""

    def renew(self, lease: Lease, rows_done: int) -> bool:
        """Keep the lease alive, reporting progress; False: the lease is lost, stop reading it."""

    def complete(self, lease: Lease, used: int, skipped: dict[str, int]) -> None:
        """The shard is read: ``used`` rows became samples, the others were skipped by reason."""

    def release(self, lease: Lease, rows_done: int) -> None:
        """The reader stops before the shard's end (the peer is leaving): hand the shard back."""

    def max_empty_shards(self, worker: int, num_workers: int) -> int:
        """Consecutive shards without one usable row after which this worker gives up."""


class LocalShards:
    """The peer's own plan: each worker cycles through a fixed share of the shards.

    Training: the share is drawn once from a seed-dependent order (so peers with different seeds split
    files differently), reshuffled every pass, endlessly. Evaluation: shards in plan order, one pass.
    """

    def __init__(self, plan: DatasetPlan, train: bool, seed: int) -> None:
        self.plan, self.train, self.seed = plan, train, seed
        self._cursor: dict[int, int] = {}

    def _share(self, worker: int, num_workers: int) -> list[Shard]:
        shards = list(self.plan.shards)
        if self.train:
            random.Random(f"shards:{self.seed}").shuffle(shards)
        return shards[worker::num_workers]

    def acquire(self, worker: int, num_workers: int) -> Lease | None:
        share = self._share(worker, num_workers)
        position = self._cursor.get(worker, 0)
        if not share or (not self.train and position >= len(share)):
            return None
        self._cursor[worker] = position + 1
        data_pass, index = divmod(position, len(share))
        if self.train:
            order = list(range(len(share)))
            random.Random(f"pass:{self.seed}:{worker}:{data_pass}").shuffle(order)
            index = order[index]
        return Lease(share[index], self.plan.root, data_pass=data_pass)

    def renew(self, lease: Lease, rows_done: int) -> bool:
        return True

    def complete(self, lease: Lease, used: int, skipped: dict[str, int]) -> None:
        pass

    def release(self, lease: Lease, rows_done: int) -> None:
        pass

    def max_empty_shards(self, worker: int, num_workers: int) -> int:
        return max(len(self._share(worker, num_workers)), 1)


@dataclass
class Batch:
    """Normalised images, labels, and what was dropped on the way (summed by the caller)."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)
    passes: int = 0  # complete passes over the data so far


class _WorkerBatch(TypedDict):
    images: torch.Tensor  # uint8 (B, 3, S, S); B may be 0 when only skips are reported
    labels: torch.Tensor
    skipped: dict[str, int]
    worker: int
    passes: int
    exhausted: bool  # this worker found no usable row in a full round of shards: it stopped


class _Tally:
    """One lease's accounting while its rows travel through the fetch stage and the shuffle buffer."""

    @property
    def progress(self) -> int:
        """Rows of the shard resolved so far, as a resume point. With a shuffle buffer the rows still in it
        are a random subset of those read, so a resumed reader is exact to within the buffer's size."""
        return self.lease.start_row + self.rows_read - self.pending

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.used = 0
        self.skipped: Counter[str] = Counter()
        self.pending = 0  # rows read but not yet resolved into a sample or a skip
        self.rows_read = 0
        self.renewed = time.monotonic()
        self.read_done = False
        self.lost = False  # the coordinator gave the shard to someone else: do not report it done


# A labelled row on its way to decoding: (tally, id, label, image bytes).
_Pending = tuple[_Tally, str | None, int, bytes | None]


class _Stream(IterableDataset):
    def __init__(self, source: ShardSource, config: DataConfig) -> None:
        super().__init__()
        self.source = source
        self.config = config

    def __iter__(self) -> Iterator[_WorkerBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from _Worker(self.source, self.config, worker, num_workers).batches()


class _Worker:
    """One worker's loop: leases in, batches out; every row ends as a sample or a counted skip."""

    def __init__(self, source: ShardSource, config: DataConfig, worker: int, num_workers: int) -> None:
        self.source, self.config, self.worker, self.num_workers = source, config, worker, num_workers
        # String seeds hash deterministically (unlike hash() of a tuple across processes).
        self.rng = random.Random(f"stream:{config.seed}:{worker}")
        self.skipped: Counter[str] = Counter()  # since the last batch
        self.passes = 0
        self.min_side = decode_min_side(config.image_size, config.train, config.min_crop_scale)
        self.label_map = _load_label_map(config.labels)
        self.randaugment = RandAugment(config.randaugment) if config.train and config.randaugment else None
        self.open: list[_Tally] = []

    def batches(self) -> Iterator[_WorkerBatch]:
        cfg = self.config
        images: list[torch.Tensor] = []
        labels: list[int] = []
        # Fix: count *distinct* shards closed without a usable row since the last one that had some. A plain
        # count of closures stopped workers whose share still held good data: each pass is reshuffled, so
        # an empty shard (unreadable file, no labelled row) ending one pass and starting the next counted
        # twice, and a good shard closes only once the shuffle buffer hands out its rows, which can be after
        # the next pass's first empty shards. With a share of [good, broken] the worker stopped within a few
        # passes (with one worker: RuntimeError "no usable rows"). Distinct, a share of N stops only when
        # all N shards are empty, after one pass as before.
        empty: set[str] = set()
        limit = self.source.max_empty_shards(self.worker, self.num_workers)
        for item in self._samples():
            if isinstance(item, _Tally):  # a shard was closed
                if item.used:
                    empty.clear()
                else:
                    empty.add(item.lease.shard.key)
                if len(empty) >= limit:
                    logger.warning("worker %d: no usable row in %d shards in a row (skipped %s); it stops",
                                   self.worker, len(empty), dict(self.skipped))
                    yield self._batch(images, labels, exhausted=True)
                    return
                continue
            images.append(item[0])
            labels.append(item[1])
            if len(images) == cfg.batch_size:
                self._renew_due()
                yield self._batch(images, labels, exhausted=False)
                images, labels = [], []
        if images or self.skipped:
            yield self._batch(images, labels, exhausted=False)

    def _renew_due(self) -> None:
        """Renew every open lease whose renewal is due: its rows may wait in the buffer long after reading."""
        now = time.monotonic()
        for tally in self.open:
            lease = tally.lease
            if tally.lost or not lease.renew_every or now - tally.renewed < lease.renew_every:
                continue
            tally.renewed = now
            if not self.source.renew(lease, tally.progress):
                logger.info("worker %d: lease on %s was lost; another peer has it now", self.worker, lease.shard.key)
                tally.lost = True

    def _batch(self, images: list[torch.Tensor], labels: list[int], *, exhausted: bool) -> _WorkerBatch:
        size = self.config.image_size
        stacked = torch.stack(images) if images else torch.empty((0, 3, size, size), dtype=torch.uint8)
        skipped, self.skipped = dict(self.skipped), Counter()
        return _WorkerBatch(images=stacked, labels=torch.tensor(labels, dtype=torch.int64), skipped=skipped,
                            worker=self.worker, passes=self.passes, exhausted=exhausted)

    def _samples(self) -> Iterator[tuple[torch.Tensor, int] | _Tally]:
        """(image, label) samples, and each shard's tally once it is closed.

        Training shuffles in blocks: the buffer fills to ``shuffle_buffer`` rows, is shuffled, and drains
        completely. A continuous buffer (pop one random row per row read) would let a few rows of every
        shard linger for thousands of reads, keeping its lease open and its completion unreported long
        after the shard was read; in blocks, a shard closes at most one buffer after its last row.
        Evaluation keeps shard order. A new pass always starts with an empty buffer.
        """
        buffer: list[_Pending] = []
        capacity = max(self.config.shuffle_buffer, 1) if self.config.train else 1

        def drain() -> Iterator[tuple[torch.Tensor, int] | _Tally]:
            if self.config.train:
                self.rng.shuffle(buffer)
            for pending in buffer:
                yield from self._decode(pending)
            buffer.clear()

        for item in self._resolved_rows():
            if isinstance(item, _Tally):  # a shard's reading has finished
                yield from self._close_finished()
                continue
            if item[0].lease.data_pass != self.passes:  # a new pass: finish the previous one first
                yield from drain()
                self.passes = item[0].lease.data_pass
            buffer.append(item)
            if len(buffer) >= capacity:
                yield from drain()
        yield from drain()
        yield from self._close_finished()
        self.passes += 1

    def _decode(self, item: _Pending) -> Iterator[tuple[torch.Tensor, int] | _Tally]:
        tally, row_id, label, data = item
        tally.pending -= 1
        cfg = self.config
        try:
            image = decode_image(data, max_pixels=cfg.max_image_pixels, min_side=self.min_side)
        except UnusableImage as error:
            self._skip(tally, error.reason, row_id, str(error))
        else:
            if cfg.train:
                tensor = train_transform(image, cfg.image_size, self.rng, scale=(cfg.min_crop_scale, 1.0),
                                         augment=self.randaugment)
            else:
                tensor = eval_transform(image, cfg.image_size)
            tally.used += 1
            yield tensor, label
        yield from self._close_finished()

    def _close_finished(self) -> Iterator[_Tally]:
        """Report (and yield) every shard whose rows are all resolved into samples or skips."""
        still_open = []
        for tally in self.open:
            if tally.read_done and tally.pending == 0:
                if not tally.lost:
                    self.source.complete(tally.lease, tally.used, dict(tally.skipped))
                yield tally
            else:
                still_open.append(tally)
        self.open = still_open

    def _resolved_rows(self) -> Iterator[_Pending | _Tally]:
        """Labelled rows with their image bytes (URL rows downloaded in concurrent chunks), interleaved
        with a finished shard's tally once its last row has been handed on."""
        for tally, rows in self._leased_rows():
            if rows is None:
                tally.read_done = True
                yield tally
                continue
            with_bytes = [r for r in rows if r[3] is not None or r[4] is None]
            with_urls = [r for r in rows if r[3] is None and r[4] is not None]
            for row_id, label, _, data, _ in with_bytes:
                yield tally, row_id, label, data
            if with_urls:
                by_key = {i: r for i, r in enumerate(with_urls)}
                for key, body, reason in fetch_images(((i, r[4]) for i, r in by_key.items()), self.config.fetch):
                    row_id, label = by_key[key][0], by_key[key][1]
                    if body is None:
                        tally.pending -= 1
                        self._skip(tally, reason or "url_error", row_id, by_key[key][4])
                    else:
                        yield tally, row_id, label, body

    def _leased_rows(self) -> Iterator[tuple[_Tally, list | None]]:
        """(tally, chunk of labelled rows) per chunk of a shard, then (tally, None) at its end."""
        chunk_size = 64
        while True:
            lease = self.source.acquire(self.worker, self.num_workers)
            if lease is None:
                return
            tally = _Tally(lease)
            self.open.append(tally)
            chunk: list = []
            finished = False
            try:
                for row in iter_shard(lease.root, lease.shard, lease.start_row):
                    tally.rows_read += 1
                    labelled = self._label(tally, row)
                    if labelled is not None:
                        tally.pending += 1
                        chunk.append(labelled)
                    if len(chunk) >= chunk_size:
                        yield tally, chunk
                        chunk = []
                    self._renew_due()
                    if tally.lost:  # the rows already read are trained on; the rest is someone else's now
                        finished = True
                        break
                finished = True
            except ShardUnreadable as error:
                unread = max(lease.shard.num_rows - lease.start_row - tally.rows_read, 1)
                logger.warning("worker %d: skipping the rest of %s (%d rows): %s", self.worker, lease.shard.key,
                               unread, error)
                tally.skipped[error.reason] += unread
                self.skipped[error.reason] += unread
                finished = True
            finally:
                if not finished:  # closed early: the peer is leaving mid-shard
                    self.source.release(lease, tally.progress)
            if chunk:
                yield tally, chunk
            yield tally, None

    def _label(self, tally: _Tally, row: Row) -> tuple | None:
        """(id, label, None, image bytes, url) for a row with a usable label; others are counted and dropped
        here, before they take download, shuffle-buffer or decode time."""
        if row.id is not None and row.id in self.label_map:
            label: int | None = self.label_map[row.id]
        elif not _is_missing(row.label):
            label = label_from_value(row.label, self.config.num_classes)
            if label is None:
                self._skip(tally, "bad_label", row.id, f"label {row.label!r}")
                return None
        else:
            label = classify_caption(row.caption)
            if label is None:
                self._skip(tally, "no_label", row.id, f"caption {row.caption!r}")
                return None
        if row.image is None and row.url is None:
            self._skip(tally, "no_image", row.id, "no image bytes and no URL")
            return None
        return row.id, label, None, row.image, row.url

    def _skip(self, tally: _Tally, reason: str, row_id: str | None, detail: object) -> None:
        tally.skipped[reason] += 1
        self.skipped[reason] += 1
        logger.debug("skipping row %s (%s: %s)", row_id, reason, detail)


def _load_label_map(labels: str | None) -> dict[str, int]:
    if not labels:
        return {}
    from .llm_labels import load_labels

    return load_labels(labels)


def _is_missing(cell: object) -> bool:
    """A null label cell means "use the caption"; NaN is how pandas writes a null int."""
    return cell is None or (isinstance(cell, float) and math.isnan(cell))


def make_loader(config: DataConfig, source: ShardSource | None = None) -> Iterator[Batch]:
    """Batches from ``source`` (default: a `LocalShards` plan of ``config.files``): endless shuffled passes
    when training, one ordered pass otherwise.

    A local plan is built here, so a wrong path or schema fails on this call rather than inside a worker.
    """
    if source is None:
        plan = local_plan(config.files, config.shard_rows)
        logger.info("data: %d shards, %d rows from %s (%s, %d workers)", len(plan.shards), plan.num_rows,
                    config.files, "train" if config.train else "eval", config.num_workers)
        source = LocalShards(plan, config.train, config.seed)
        active_workers = min(max(config.num_workers, 1), len(plan.shards))
    else:
        active_workers = max(config.num_workers, 1)
    loader = DataLoader(_Stream(source, config), batch_size=None, num_workers=config.num_workers,
                        persistent_workers=False)
    return _assemble(loader, config, active_workers)


def _assemble(loader: Iterable[_WorkerBatch], config: DataConfig, active_workers: int) -> Iterator[Batch]:
    # Passes are complete when every worker still reading has finished its share of them. Holding back one
    # batch lets skips that a worker reports after its last real batch still reach the caller.
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
        images = normalize(item["images"])
        if config.pin_memory:  # page-locked, so the copy to the GPU can overlap the previous step
            images = images.pin_memory()
        pending = Batch(images=images, labels=item["labels"], skipped=dict(skipped),
                        passes=min(worker_passes.values(), default=item["passes"]))
        skipped = Counter()
    if pending is not None:
        pending.skipped = dict(Counter(pending.skipped) + skipped)
        yield pending
    elif config.train:
        raise RuntimeError(f"no usable rows in {config.files or 'the leased shards'!r}: every row was skipped "
                           f"({dict(skipped)}); check that captions name a category or add a 'label' column")
    else:
        logger.warning("eval data %r has no usable rows (skipped %s)", config.files, dict(skipped))

