"""Datasets cut into shards: the unit the coordinator leases to peers, and how a peer reads one.

A shard is a contiguous piece of one file, sized (``shard_rows``) so a consumer GPU trains through it
in minutes: a range of parquet row groups, a range of JSON lines, or a slice of an ImageFolder's files.
Shard paths are relative to the plan's ``root`` (a local directory or ``hf://datasets/OWNER/NAME``), so
a peer holding its own copy of the data can read the same shard from a different root.

Formats, chosen by file extension:
  * ``.parquet``: the PD-Extended schema (``image`` struct with ``bytes``, ``caption``), ImageNet-style
    Hub datasets (``image`` + integer ``label``), or LAION-style metadata (``url`` + caption);
  * ``.jsonl``: one JSON object per line with ``url`` and a ``label`` or ``caption`` (LAION's
    ``URL``/``TEXT`` keys too);
  * a directory of class folders holding images (torchvision's ImageFolder).

Parquet is streamed with ``datasets`` (``streaming=True``): it reads remote ``hf://`` files with range
requests, row group by row group, so a peer never downloads a whole file before training on it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .labels import CATEGORY_INDEX
from .parquet import resolve_files

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DATA_SUFFIXES = (".parquet", ".jsonl")
URL_KEYS = ("url", "URL", "image_url")
CAPTION_KEYS = ("caption", "TEXT", "text")
READ_ROWS = 64  # rows per Arrow batch read from a row group: PD-Extended images are up to a few MB each


class Row(NamedTuple):
    """One sample before decoding: exactly one of ``image`` / ``url`` is set (or neither: a bad row)."""

    id: str | None
    caption: str | None
    label: object  # a class index, a category name or None (then the caption decides)
    image: bytes | None
    url: str | None


class ShardUnreadable(Exception):
    """The shard's file cannot be read (truncated, not parquet, missing columns): skip the whole shard."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Shard:
    """A leasable piece of one file. ``start``/``stop`` index row groups (parquet), lines (jsonl) or
    entries of ``files`` (imagefolder)."""

    format: str  # "parquet" | "jsonl" | "imagefolder"
    path: str  # relative to the plan root; for imagefolder the folder ("" = the root itself)
    start: int
    stop: int
    num_rows: int
    files: tuple[str, ...] = ()  # imagefolder: image paths relative to ``path``
    labels: tuple[int, ...] = ()  # imagefolder: the class of each file

    @property
    def key(self) -> str:
        return f"{self.format}:{self.path}:{self.start}-{self.stop}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Shard:
        return cls(format=str(d["format"]), path=str(d["path"]), start=int(d["start"]), stop=int(d["stop"]),
                   num_rows=int(d["num_rows"]), files=tuple(d.get("files", ())), labels=tuple(d.get("labels", ())))


@dataclass
class DatasetPlan:
    """Every shard of a dataset, in a fixed order that every peer and the coordinator agree on."""

    spec: str  # what the user passed (--dataset / --data)
    root: str
    shards: list[Shard] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)


def join_root(root: str, path: str) -> str:
    if not path:
        return root
    return posixpath.join(root, path) if "://" in root else os.path.join(root, path)


# ----------------------------------------------------------------------------------------------- planning


def hub_root(repo: str, revision: str | None = None) -> str:
    return f"hf://datasets/{repo}" + (f"@{revision}" if revision else "")


def is_hub_spec(spec: str) -> bool:
    """``OWNER/NAME`` (not an existing local path) or an ``hf://datasets/...`` URL."""
    if spec.startswith("hf://"):
        return True
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(spec) and not any(c in spec for c in "*?[")


def list_hub_files(repo: str, subset: str | None = None, revision: str | None = None) -> list[str]:
    """The dataset repo's parquet/jsonl files (optionally only those under a ``subset`` folder), sorted."""
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
    found = sorted(f for f in files if f.endswith(DATA_SUFFIXES)
                   and (subset is None or subset in f.split("/")[:-1] or f.startswith(subset.rstrip("/") + "/")))
    if not found:
        where = f" under {subset!r}" if subset else ""
        raise ValueError(f"the Hub dataset {repo!r} has no .parquet or .jsonl files{where}; "
                         "check the repository name and --subset")
    return found


def _local_files(spec: str) -> tuple[str, list[str]]:
    """(root, files relative to root) for a file, a directory (searched recursively) or a glob."""
    try:
        found = [os.path.abspath(p) for p in resolve_files(spec, DATA_SUFFIXES)]
    except ValueError:
        return "", []
    root = os.path.abspath(spec) if os.path.isdir(spec) else os.path.commonpath([os.path.dirname(p) for p in found])
    return root, [os.path.relpath(p, root) for p in found]


def is_image_folder(path: str) -> bool:
    """A directory whose sub-directories hold images and which holds no parquet/jsonl files."""
    if not os.path.isdir(path):
        return False
    with os.scandir(path) as entries:
        entries = list(entries)
    subdirs = [e.path for e in entries if e.is_dir()]
    if not subdirs:
        return False
    # Fix: the rule above was not applied (this returned True at the first image), so a directory of
    # parquet/jsonl files that also held a folder of images (a README's assets/, sample previews) was
    # planned as an ImageFolder of those few images and its data files were silently ignored. Any
    # data file, at the top or in a sub-directory, now means "plan the data files". Each sub-directory is
    # walked from its own path as before, so class folders that are symlinks are still followed.
    if any(e.is_file() and e.name.endswith(DATA_SUFFIXES) for e in entries):
        return False
    has_images = False
    for sub in subdirs:
        for _, _, names in os.walk(sub):
            if any(n.endswith(DATA_SUFFIXES) for n in names):
                return False
            has_images = has_images or any(n.lower().endswith(IMAGE_SUFFIXES) for n in names)
    return has_images


def plan_dataset(spec: str, shard_rows: int = 20_000, *, subset: str | None = None,
                 revision: str | None = None) -> DatasetPlan:
    """Cut ``spec`` (a Hub dataset repo, a local directory, file or glob, or an ImageFolder) into shards.

    Only parquet footers are read (for Hub files: a few range requests each), never the images.
    """
    if shard_rows < 1:
        raise ValueError(f"shard_rows={shard_rows}: must be at least 1")
    if is_hub_spec(spec):
        repo = spec.removeprefix("hf://datasets/").split("@")[0]
        revision = revision or (spec.split("@")[1] if "@" in spec else None)
        root, files = hub_root(repo, revision), list_hub_files(repo, subset, revision)
    elif is_image_folder(spec):
        return DatasetPlan(spec, os.path.abspath(spec), plan_image_folder(spec, shard_rows))
    else:
        root, files = _local_files(spec)
        if subset is not None:
            files = [f for f in files if subset in f.split(os.sep)[:-1]]
        if not files:
            raise ValueError(
                f"no .parquet or .jsonl files found for {spec!r} (looked for it as a file, as a directory searched "
                "recursively, as a glob, as an ImageFolder of class directories and as a Hub dataset OWNER/NAME); "
                "check the path, or create demo data with `convforever-demo-data --out DIR` and pass DIR/train")
    shards: list[Shard] = []
    errors: list[str] = []
    for i, rel in enumerate(files):
        try:
            shards += plan_file(root, rel, shard_rows)
        except ShardUnreadable as e:
            errors.append(str(e))
            logger.warning(f"leaving {rel} out of the plan: {e}")
        if len(files) > 20 and (i + 1) % 20 == 0:
            logger.info(f"planning {spec}: read {i + 1}/{len(files)} file footers, {len(shards)} shards so far")
    if not shards:
        raise ValueError(f"none of the {len(files)} files of {spec!r} has a readable row: " + "; ".join(errors[:3]))
    return DatasetPlan(spec, root, shards)


def plan_file(root: str, rel: str, shard_rows: int) -> list[Shard]:
    path = join_root(root, rel)
    if rel.endswith(".jsonl"):
        with fsspec.open(path, "rb") as f:
            lines = sum(1 for _ in f)
        return [Shard("jsonl", rel, a, min(a + shard_rows, lines), min(a + shard_rows, lines) - a)
                for a in range(0, lines, shard_rows)]
    sizes = parquet_layout(path)[1]
    shards, start, rows = [], 0, 0
    for i, n in enumerate(sizes):
        rows += n
        if rows >= shard_rows or i == len(sizes) - 1:
            if rows:
                shards.append(Shard("parquet", rel, start, i + 1, rows))
            start, rows = i + 1, 0
    return shards


def parquet_layout(path: str) -> tuple[list[str], list[int]]:
    """(column names, rows per row group) from the footer, after checking the columns are usable."""
    try:
        with fsspec.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            check_columns(path, parquet.schema_arrow)
            meta = parquet.metadata
            return parquet.schema_arrow.names, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except (OSError, pa.ArrowInvalid) as error:
        raise ShardUnreadable("bad_file", f"{path} is not a readable parquet file: {error}") from None


def check_columns(path: str, schema: pa.Schema) -> None:
    """Raise ShardUnreadable("bad_schema") unless rows have an image (bytes or URL) and a label or caption."""
    names = schema.names
    has_image = "image" in names and pa.types.is_struct(schema.field("image").type) \
        and schema.field("image").type.get_field_index("bytes") >= 0
    if not has_image and not any(k in names for k in URL_KEYS):
        raise ShardUnreadable("bad_schema", f"{path} has neither an 'image' struct with 'bytes' (PD-Extended, "
                              f"ImageNet-style) nor a 'url' column (LAION-style); it has: {', '.join(names)}")
    if "label" not in names and not any(k in names for k in CAPTION_KEYS):
        raise ShardUnreadable("bad_schema", f"{path} has no 'label' and no 'caption' column to label rows from; "
                              f"it has: {', '.join(names)}")


def plan_image_folder(path: str, shard_rows: int) -> list[Shard]:
    """Class directories -> labels: category names map to their index, other names to their sorted index."""
    root = os.path.abspath(path)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    by_name = all(c.lower() in CATEGORY_INDEX for c in classes)
    files: list[tuple[str, int]] = []
    for i, name in enumerate(classes):
        label = CATEGORY_INDEX[name.lower()] if by_name else i
        for dirpath, _, names in sorted(os.walk(os.path.join(root, name))):
            files += [(os.path.relpath(os.path.join(dirpath, n), root), label)
                      for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES)]
    if not by_name:
        logger.info(f"ImageFolder {path}: class folders are not category names, labels are their sorted index")
    return [Shard("imagefolder", "", a, min(a + shard_rows, len(files)), len(files[a:a + shard_rows]),
                  files=tuple(f for f, _ in files[a:a + shard_rows]), labels=tuple(lb for _, lb in files[a:a + shard_rows]))
            for a in range(0, len(files), shard_rows)]


# ------------------------------------------------------------------------------------------------ reading


def iter_shard(root: str, shard: Shard, start_row: int = 0) -> Iterator[Row]:
    """The shard's rows from ``start_row`` on (resuming a shard someone else started)."""
    if shard.format == "parquet":
        yield from _iter_parquet(join_root(root, shard.path), shard, start_row)
    elif shard.format == "jsonl":
        yield from _iter_jsonl(join_root(root, shard.path), shard, start_row)
    elif shard.format == "imagefolder":
        base = join_root(root, shard.path)
        for rel, label in list(zip(shard.files, shard.labels))[start_row:]:
            try:
                with open(os.path.join(base, rel), "rb") as f:
                    data = f.read()
            except OSError:
                data = None  # counted as no_image by the decoder
            yield Row(rel, None, label, data, None)
    else:
        raise ShardUnreadable("bad_shard", f"unknown shard format {shard.format!r}")


def _iter_parquet(path: str, shard: Shard, start_row: int) -> Iterator[Row]:
    import datasets

    _quiet_datasets(datasets)

    try:
        schema_names, groups = parquet_layout(path)
        if len(groups) < shard.stop:
            raise ShardUnreadable("bad_file", f"{path} has {len(groups)} row groups, the plan expects {shard.stop}")
        columns = [c for c in ("id", "image", "label", *CAPTION_KEYS, *URL_KEYS) if c in schema_names]
        # One streaming dataset per file; reshard() splits it into one datasets-shard per row group.
        stream = datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True,
                                       columns=columns).reshard()
    except ShardUnreadable:
        raise
    except Exception as error:  # datasets wraps arrow/fsspec errors in several types
        raise ShardUnreadable("bad_file", f"{path}: {type(error).__name__}: {error}") from None
    skip = start_row
    for group in range(shard.start, shard.stop):
        rows_here = groups[group]
        if skip >= rows_here:  # resuming: whole row groups before the resume point are not read at all
            skip -= rows_here
            continue
        part = stream.shard(num_shards=stream.num_shards, index=group, contiguous=True).with_format("arrow")
        try:
            for table in part.iter(batch_size=READ_ROWS):
                if skip:
                    table, skip = table.slice(min(skip, table.num_rows)), max(0, skip - table.num_rows)
                yield from _table_rows(table)
        except Exception as error:
            raise ShardUnreadable("bad_file", f"{path} row group {group}: {type(error).__name__}: {error}") from None


def _quiet_datasets(datasets) -> None:
    """load_dataset() reports "download statistics" to an S3 endpoint on every call, with a 3 s timeout: a
    request per shard that an offline or firewalled peer waits out. Switched off once per process."""
    if datasets.config.HF_UPDATE_DOWNLOAD_COUNTS:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False


def _table_rows(table: pa.Table) -> Iterator[Row]:
    n, names = table.num_rows, table.column_names

    def column(*keys: str) -> list:
        for key in keys:
            if key in names:
                return table.column(key).to_pylist()
        return [None] * n

    if "image" in names:
        image = table.column("image").combine_chunks()
        # flatten() (unlike .field()) keeps a null image struct null instead of exposing its child slot.
        images = image.flatten()[image.type.get_field_index("bytes")].to_pylist()
    else:
        images = [None] * n
    ids, captions, labels, urls = column("id"), column(*CAPTION_KEYS), column("label"), column(*URL_KEYS)
    for i in range(n):
        yield Row(None if ids[i] is None else str(ids[i]), captions[i], labels[i], images[i], urls[i])


def _iter_jsonl(path: str, shard: Shard, start_row: int) -> Iterator[Row]:
    """Lines ``[start + start_row, stop)``. Read with fsspec line by line (not ``datasets``' json builder,
    which fails a whole file on one malformed line): a bad line becomes a row without image or URL."""
    first = shard.start + start_row
    try:
        # Fix: newline="\n" splits lines exactly where plan_file counts them (b"\n" in binary mode). With
        # the default universal newlines a lone "\r" (old Mac line ends, or a raw CR inside a caption)
        # also ended a line, shifting every later line number: rows were read twice or never.
        with fsspec.open(path, "rt", encoding="utf-8", errors="replace", newline="\n") as f:
            for number, line in enumerate(f):
                if number < first:
                    continue
                if number >= shard.stop:
                    break
                yield _json_row(line, f"{os.path.basename(path)}:{number}")
    except OSError as error:
        raise ShardUnreadable("bad_file", f"{path}: {error}") from None


def _json_row(line: str, default_id: str) -> Row:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return Row(default_id, None, None, None, None)
    if not isinstance(obj, dict):
        return Row(default_id, None, None, None, None)
    url = next((obj[k] for k in URL_KEYS if isinstance(obj.get(k), str)), None)
    caption = next((obj[k] for k in CAPTION_KEYS if isinstance(obj.get(k), str)), None)
    row_id = obj.get("id", obj.get("key", default_id))
    return Row(str(row_id), caption, obj.get("label"), None, url)


def local_plan(spec: str | Sequence[str], shard_rows: int = 20_000) -> DatasetPlan:
    """A plan for local data given as one spec or a list of files (the peer's ``--data`` without a coordinator)."""
    if isinstance(spec, (str, os.PathLike)):
        return plan_dataset(os.fspath(spec), shard_rows)
    plans = [plan_dataset(os.fspath(s), shard_rows) for s in spec]
    root = os.path.commonpath([p.root for p in plans]) if plans else ""
    shards = [Shard.from_dict({**asdict(s), "path": os.path.relpath(join_root(p.root, s.path), root)})
              for p in plans for s in p.shards]
    return DatasetPlan(",".join(map(os.fspath, spec)), root, shards)
