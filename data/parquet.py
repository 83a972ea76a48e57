"""The PD-Extended parquet schema, and finding local parquet files.

Planning and reading shards (of this and the other formats) is `shards.py`'s job.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence

import pyarrow as pa

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
def resolve_files(spec: str | os.PathLike | Sequence[str | os.PathLike],
                  suffixes: tuple[str, ...] = (".parquet",)) -> list[str]:
    """Expand a file, a directory (every file with one of ``suffixes`` below it, recursively) or a glob, or a
    list of them.

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
            found = sorted(p for suffix in suffixes
                           for p in glob.glob(os.path.join(glob.escape(item), "**", "*" + suffix), recursive=True))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not found:
            raise ValueError(
                f"no {' or '.join(x.lstrip('.') for x in suffixes)} files found for {item!r} (looked for it as a "
                f"file, as a directory containing {'/'.join('*' + x for x in suffixes)} files at any depth, and as a "
                "glob pattern); check the path, or create demo data "
                "with `convforever-demo-data --out DIR` and pass DIR/train")
        files.extend(found)
    return list(dict.fromkeys(files))
