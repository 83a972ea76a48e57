"""Finding and reading PD-Extended-schema parquet shards with bounded memory.

The unit of work is one (file, row group): small enough that DataLoader workers can split a handful of
shards between them, large enough that parquet reads stay sequential. Only the columns the loader needs
are read, and only ``image.bytes`` out of the image struct, so a row group is streamed in slices of
``READ_ROWS`` rows rather than materialised.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

# The Spawning/PD-Extended layout (plus an optional ``label`` column we honour when present). The image is
# the Hugging Face ``datasets`` Image feature: a struct of encoded bytes and an optional original path.
PD_EXTENDED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source_id", pa.string()),
    ("caption", pa.string()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("mime_type", pa.string()),
    ("aesthetic_score", pa.float64()),
    ("width", pa.int64()),
    ("height", pa.int64()),
])
LABEL_COLUMN = "label"

# Rows per slice read from a row group: PD-Extended images are up to a few MB each, so 64 rows keep a
# worker's parquet buffer in the tens of MB while still amortising per-read overhead.
READ_ROWS = 64


@dataclass(frozen=True)
class Unit:
    """One row group of one file: what a DataLoader worker is handed."""

    path: str
    row_group: int
    num_rows: int
    has_caption: bool
    has_label: bool
    has_id: bool


def resolve_files(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a file, a directory (every *.parquet below it, recursively) or a glob, or a list of them.

    Directories and globs are sorted so every peer sees the same file order; an explicit list keeps the
    caller's order (duplicates removed).
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("no data files given: pass a parquet file, a directory of *.parquet files or a glob")
    files: list[str] = []
    for item in specs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(glob.escape(item), "**", "*.parquet"), recursive=True))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not found:
            raise ValueError(
                f"no parquet files found for {item!r} (looked for it as a file, as a directory containing "
                "*.parquet files at any depth, and as a glob pattern); check the path, or create demo data "
                "with `convforever-demo-data --out DIR` and pass DIR/train")
        files.extend(found)
    return list(dict.fromkeys(files))


def _missing_column_error(path: str, column: str, present: Sequence[str]) -> ValueError:
    expected = ", ".join(PD_EXTENDED_SCHEMA.names)
    return ValueError(f"{path} has no {column!r} column (it has: {', '.join(present) or 'none'}); "
                      f"expected the PD-Extended schema ({expected}), optionally with a {LABEL_COLUMN!r} column")


def inspect_file(path: str) -> list[Unit]:
    """The file's non-empty row groups, after checking it has the columns the loader needs."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(f"{path} is not a readable parquet file: {error}") from error
    schema = parquet.schema_arrow
    names = schema.names
    if "image" not in names:
        raise _missing_column_error(path, "image", names)
    image_type = schema.field("image").type
    if not pa.types.is_struct(image_type) or image_type.get_field_index("bytes") < 0:
        raise ValueError(f"{path}: column 'image' is {image_type}, expected a struct with a 'bytes' field "
                         "(the Hugging Face Image feature)")
    has_caption, has_label = "caption" in names, LABEL_COLUMN in names
    if not (has_caption or has_label):
        raise _missing_column_error(path, "caption", names)
    metadata = parquet.metadata
    return [Unit(path, i, metadata.row_group(i).num_rows, has_caption, has_label, "id" in names)
            for i in range(metadata.num_row_groups) if metadata.row_group(i).num_rows > 0]


def list_units(files: Sequence[str]) -> list[Unit]:
    """Every readable row group of every file, in file order; reads only the parquet footers."""
    units = [unit for path in files for unit in inspect_file(path)]
    logger.debug("%d files, %d row groups, %d rows", len(files), len(units), sum(u.num_rows for u in units))
    return units


def iter_rows(unit: Unit) -> Iterator[tuple[str | None, str | None, object, bytes | None]]:
    """(id, caption, label cell, image bytes) for every row of the unit; absent columns give None."""
    columns = ["image.bytes"]
    columns += ["id"] * unit.has_id + ["caption"] * unit.has_caption + [LABEL_COLUMN] * unit.has_label
    parquet = pq.ParquetFile(unit.path)
    for batch in parquet.iter_batches(batch_size=READ_ROWS, row_groups=[unit.row_group], columns=columns):
        n = batch.num_rows
        # flatten() (unlike .field()) keeps a null image struct null instead of exposing its child slot.
        image = batch.column("image")
        images = image.flatten()[image.type.get_field_index("bytes")].to_pylist()
        ids = batch.column("id").to_pylist() if unit.has_id else [None] * n
        captions = batch.column("caption").to_pylist() if unit.has_caption else [None] * n
        labels = batch.column(LABEL_COLUMN).to_pylist() if unit.has_label else [None] * n
        yield from zip(ids, captions, labels, images)
