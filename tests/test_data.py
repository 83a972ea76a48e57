"""Tests for convforever.data: caption labels, parquet reading, decoding guards, transforms, loader, demo data.

Every test writes its own parquet files under tmp_path; images are tiny so the whole file runs in seconds.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from convforever.data import (
    CATEGORIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PD_EXTENDED_SCHEMA,
    Batch,
    DataConfig,
    classify_caption,
    label_from_value,
    make_loader,
    resolve_files,
    write_demo_dataset,
)
from convforever.data.demo import DEMO_CLASSES
from convforever.data.demo import main as demo_main
from convforever.data.images import (
    UnusableImage,
    decode_image,
    eval_transform,
    normalize,
    random_crop_box,
    train_transform,
)
from convforever.data.labels import CATEGORY_INDEX, keywords_for
from convforever.data.shards import iter_shard, plan_dataset

# ----------------------------------------------------------------------------------------------- helpers


def _png(width: int, height: int, colour: tuple[int, ...] = (200, 100, 50), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(width: int, height: int, colour: tuple[int, int, int] = (30, 160, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with a token IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _write(path, rows: list[dict], *, label_type: pa.DataType | None = None, row_group_size: int = 1000,
           drop: str | None = None) -> str:
    """Write rows ({caption, image, [label]}) in the PD-Extended schema, plus a label column if asked."""
    columns = {
        "id": [f"row-{i}" for i in range(len(rows))],
        "source_id": [f"test:{i}" for i in range(len(rows))],
        "caption": [r.get("caption") for r in rows],
        "image": [None if r.get("image", b"") is None else {"bytes": r.get("image"), "path": None} for r in rows],
        "mime_type": ["image/png"] * len(rows),
        "aesthetic_score": [5.0] * len(rows),
        "width": [r.get("width", 16) for r in rows],
        "height": [r.get("height", 16) for r in rows],
    }
    schema = PD_EXTENDED_SCHEMA
    if label_type is not None:
        columns["label"] = [r.get("label") for r in rows]
        schema = schema.append(pa.field("label", label_type))
    table = pa.Table.from_pydict(columns, schema=schema)
    if drop:
        table = table.drop_columns([drop])
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def _index_colour(i: int) -> tuple[int, int, int]:
    return (4 * i, 255 - 4 * i, 128)


def _decode_indices(batch: Batch) -> list[int]:
    """Recover the row index painted by _index_colour from each normalised image."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (batch.images * std + mean) * 255
    return [round(v / 4) for v in pixels[:, 0].mean(dim=(1, 2)).tolist()]


def _collect(config: DataConfig, limit: int | None = None) -> tuple[list[Batch], Counter]:
    batches, skipped = [], Counter()
    for batch in make_loader(config):
        batches.append(batch)
        skipped.update(batch.skipped)
        if limit is not None and len(batches) >= limit:
            break
    return batches, skipped


# -------------------------------------------------------------------------------------------- classifier


def test_categories_are_the_fifty_in_order():
    assert len(CATEGORIES) == len(set(CATEGORIES)) == 50
    assert CATEGORIES[:4] == ("fish", "reptile", "amphibian", "bird")
    assert CATEGORIES[18:20] == ("dog", "cat") and CATEGORIES[-1] == "landscape"


def test_every_category_and_keyword_is_reachable():
    for index, name in enumerate(CATEGORIES):
        assert classify_caption(name) == index, name
        assert classify_caption(f"A photo of a {name.upper()} in the afternoon") == index, name
        for keyword in keywords_for(name):
            assert classify_caption(keyword) == index, (name, keyword)


@pytest.mark.parametrize("caption, category", [
    ("a photo of two puppies on grass", "dog"), ("three mice in a barn", "rodent"), ("geese flying", "waterfowl"),
    ("grey wolves", "mammal"), ("boxes", "container"), ("potatoes and leeks", "vegetable"),
    ("Golden Retrievers playing", "dog"), ("wild fungi", "fungus"), ("daisies", "flower"), ("knives", "kitchenware"),
])
def test_plurals(caption, category):
    assert classify_caption(caption) == CATEGORY_INDEX[category]


@pytest.mark.parametrize("caption, expected", [
    ("catalog of 1920s furniture", "furniture"), ("a catalog page", None), ("dogma", None), ("scattered", None),
    ("bre", None), ("fresh bread", "bread"), ("The cat's whiskers", "cat"), ("HOT-DOG!", "dish"),
    ("bobcat", "cat"), ("a catfish", "fish"), ("t-shirt print", "apparel"),
])
def test_word_boundaries(caption, expected):
    assert classify_caption(caption) == (None if expected is None else CATEGORY_INDEX[expected])


@pytest.mark.parametrize("caption, category", [
    # 1. a phrase beats a keyword it contains
    ("hot dog with mustard", "dish"), ("a guinea pig", "rodent"), ("computer mouse on a desk", "electronics"),
    ("a bird of prey", "raptor"),
    # 2. specific beats generic, wherever it appears
    ("a bowl of strawberries", "fruit"), ("vase with roses", "flower"), ("mountain landscape with a horse", "ungulate"),
    ("a small bird, a sparrow", "songbird"), ("a mammal: the red fox", "mammal"),
    # 3. otherwise the earliest keyword wins
    ("a puppy on a bridge", "dog"), ("a bridge with a puppy", "bridge"), ("a cat and a dog", "cat"),
    ("a dog and a cat", "dog"), ("a beach at sunset", "landscape"),
])
def test_priority_rule(caption, category):
    assert classify_caption(caption) == CATEGORY_INDEX[category]


@pytest.mark.parametrize("caption", ["", None, "untitled", "IMG_2041.JPG", "abstract composition no. 7", "  "])
def test_no_match_is_none(caption):
    assert classify_caption(caption) is None


def test_label_from_value():
    assert label_from_value(3) == 3 and label_from_value(np.int64(5)) == 5 and label_from_value(3.0) == 3
    assert label_from_value("dog") == 18 and label_from_value(" Dog ") == 18 and label_from_value("19") == 19
    for bad in (50, -1, 2.5, float("nan"), "unicorn", True, None, [1]):
        assert label_from_value(bad) is None, bad


# ------------------------------------------------------------------------------------------------ parquet


def test_resolve_files_file_dir_glob(tmp_path):
    rows = [{"caption": "a dog", "image": _png(8, 8)}]
    (tmp_path / "b" / "deep").mkdir(parents=True)
    files = [_write(tmp_path / "b" / "deep" / "z.parquet", rows), _write(tmp_path / "b" / "a.parquet", rows)]
    (tmp_path / "b" / "notes.txt").write_text("not data")
    assert resolve_files(files[0]) == [files[0]]
    assert resolve_files(tmp_path / "b") == sorted(files)
    assert resolve_files(str(tmp_path / "b" / "*.parquet")) == [files[1]]
    assert resolve_files([files[0], files[1], files[0]]) == files


def test_resolve_files_error_says_what_was_looked_for(tmp_path):
    with pytest.raises(ValueError, match=r"no parquet files found for .*nowhere.*directory.*glob"):
        resolve_files(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        make_loader(DataConfig(str(tmp_path / "empty")))


@pytest.mark.parametrize("column", ["image", "caption"])
def test_missing_column_names_column_and_file(tmp_path, column):
    path = _write(tmp_path / "bad.parquet", [{"caption": "a dog", "image": _png(8, 8)}], drop=column)
    expected = {"image": "has neither an 'image' struct", "caption": "has no 'label' and no 'caption' column"}[column]
    with pytest.raises(ValueError, match=rf"bad\.parquet {expected}"):
        make_loader(DataConfig(path))


def test_reads_pd_extended_rows_in_row_groups(tmp_path):
    rows = [{"caption": f"dog number {i}", "image": _png(8, 8)} for i in range(10)]
    path = _write(tmp_path / "x.parquet", rows, row_group_size=4)
    plan = plan_dataset(path, shard_rows=5)  # row groups of 4, 4, 2 -> shards of 8 and 2 rows
    assert [(s.start, s.stop, s.num_rows) for s in plan.shards] == [(0, 2, 8), (2, 3, 2)]
    read = [row for shard in plan.shards for row in iter_shard(plan.root, shard)]
    assert [r.id for r in read] == [f"row-{i}" for i in range(10)]
    assert [r.caption for r in read] == [f"dog number {i}" for i in range(10)]
    assert all(r.label is None and r.image == rows[0]["image"] and r.url is None for r in read)
    # Resuming inside a shard skips whole row groups without reading them, then rows within one.
    assert [r.id for r in iter_shard(plan.root, plan.shards[0], start_row=5)] == ["row-5", "row-6", "row-7"]


# ------------------------------------------------------------------------------------ decoding and skips


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    pixel_cap_before = Image.MAX_IMAGE_PIXELS
    good = [{"caption": f"a {name}", "image": _png(20, 16, _index_colour(i))}
            for i, name in enumerate(["dog", "cat", "horse", "boat"])]
    truncated = _jpeg(40, 40)
    bad = [
        {"caption": "untitled", "image": _png(20, 16)},                       # no_label
        {"caption": "abstract composition", "image": _png(20, 16)},           # no_label
        {"caption": "a dog", "image": b"\xff\xd8\xff\xe0 not really a jpeg"},  # corrupt_image
        {"caption": "a dog", "image": truncated[: len(truncated) // 2]},      # corrupt_image
        {"caption": "a dog", "image": _png_header_only(30000, 30000)},        # too_large (Pillow's bomb error)
        {"caption": "a dog", "image": _png(400, 400)},                        # too_large (our cap below)
        {"caption": "a dog", "image": None},                                  # no_image
    ]
    path = _write(tmp_path / "mixed.parquet", bad[:3] + good[:2] + bad[3:] + good[2:])
    batches, skipped = _collect(DataConfig(path, train=False, image_size=16, batch_size=3, max_image_pixels=100_000))
    assert skipped == {"no_label": 2, "corrupt_image": 2, "too_large": 2, "no_image": 1}
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert labels == [CATEGORY_INDEX[n] for n in ["dog", "cat", "ungulate", "watercraft"]]
    assert [len(b.labels) for b in batches] == [3, 1]  # the last partial batch is kept
    assert Image.MAX_IMAGE_PIXELS == pixel_cap_before  # no global PIL state changed


def test_decode_guards():
    with pytest.raises(UnusableImage) as error:
        decode_image(_png_header_only(12000, 12000), max_pixels=10**12)  # above Pillow's own hard limit
    assert error.value.reason == "too_large"
    with pytest.raises(UnusableImage) as error:
        decode_image(_png(300, 200), max_pixels=300 * 200 - 1)
    assert error.value.reason == "too_large"
    with pytest.raises(UnusableImage) as error:
        decode_image(b"GIF89a garbage", max_pixels=10**6)
    assert error.value.reason == "corrupt_image"
    transparent = decode_image(_png(4, 4, (0, 0, 0, 0), mode="RGBA"), max_pixels=10**6)
    assert transparent.mode == "RGB" and transparent.getpixel((0, 0)) == (255, 255, 255)
    grey = decode_image(_png(4, 4, (7,), mode="L"), max_pixels=10**6)
    assert grey.mode == "RGB" and grey.getpixel((1, 1)) == (7, 7, 7)
    # JPEG draft decoding keeps the shorter side >= min_side while skipping most of the work.
    assert min(decode_image(_jpeg(800, 640), max_pixels=10**7, min_side=100).size) >= 100


def test_label_column_int_and_name_honoured(tmp_path):
    int_rows = [
        {"caption": "a dog", "label": 5, "image": _png(16, 16)},     # label wins over the caption
        {"caption": "a dog", "label": None, "image": _png(16, 16)},  # null label: caption decides
        {"caption": "a dog", "label": 77, "image": _png(16, 16)},    # out of range: bad_label
        {"caption": "untitled", "label": None, "image": _png(16, 16)},  # nothing: no_label
    ]
    name_rows = [
        {"caption": "untitled", "label": "cat", "image": _png(16, 16)},
        {"caption": "a dog", "label": "unicorn", "image": _png(16, 16)},
        {"caption": "a dog", "label": "49", "image": _png(16, 16)},
    ]
    files = [_write(tmp_path / "a.parquet", int_rows, label_type=pa.int64()),
             _write(tmp_path / "b.parquet", name_rows, label_type=pa.string())]
    batches, skipped = _collect(DataConfig(files, train=False, image_size=16, batch_size=8))
    assert torch.cat([b.labels for b in batches]).tolist() == [5, 18, 19, 49]
    assert skipped == {"bad_label": 2, "no_label": 1}


# ------------------------------------------------------------------------------------------- transforms


def test_transforms_shape_dtype_and_determinism():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    out = eval_transform(image, 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out, eval_transform(image, 32))
    a = train_transform(image, 24, random.Random(1), scale=(0.35, 1.0))
    assert a.shape == (3, 24, 24) and a.dtype == torch.uint8
    assert torch.equal(a, train_transform(image, 24, random.Random(1), scale=(0.35, 1.0)))
    assert not torch.equal(a, train_transform(image, 24, random.Random(2), scale=(0.35, 1.0)))


def test_random_crop_box_respects_scale_and_bounds():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_crop_box(90, 50, rng, (0.35, 1.0))
        assert 0 <= left < right <= 90 and 0 <= top < bottom <= 50
        assert 0.3 <= (right - left) * (bottom - top) / (90 * 50) <= 1.0
    # No 3:4..4:3 crop of 90%+ fits a 100:1 strip: the fallback takes the widest allowed central crop.
    assert random_crop_box(1000, 10, rng, (0.9, 1.0)) == (493, 0, 506, 10)


def test_normalize_uses_imagenet_stats():
    x = torch.stack([torch.zeros(3, 2, 2, dtype=torch.uint8), torch.full((3, 2, 2), 255, dtype=torch.uint8)])
    y = normalize(x)
    assert y.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(y[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(y[1, :, 0, 0], (1 - mean) / std)
    mean_colour = tuple(round(m * 255) for m in IMAGENET_MEAN)
    centred = normalize(eval_transform(Image.new("RGB", (20, 20), mean_colour), 8))
    assert centred.abs().max() < 0.02


# ----------------------------------------------------------------------------------------------- loader


@pytest.fixture
def indexed_shards(tmp_path):
    """3 files x 2 row groups; row i is painted with _index_colour(i); some rows unusable."""
    files, valid, i = [], {}, 0
    expected_skips = Counter()
    for f in range(3):
        rows = []
        for _ in range(10):
            if i % 7 == 3:
                rows.append({"caption": "untitled scan", "image": _png(24, 20, _index_colour(i))})
                expected_skips["no_label"] += 1
            elif i % 11 == 5:
                rows.append({"caption": "a dog", "image": b"\x89PNG\r\n\x1a\n broken"})
                expected_skips["corrupt_image"] += 1
            else:
                name = CATEGORIES[i % 50]
                rows.append({"caption": f"a photo of a {name}", "image": _png(24, 20, _index_colour(i))})
                valid[i] = i % 50
            i += 1
        files.append(_write(tmp_path / f"part-{f:05d}.parquet", rows, row_group_size=5))
    return str(tmp_path), valid, expected_skips


def test_eval_with_two_workers_sees_every_valid_row_once(indexed_shards):
    root, valid, expected_skips = indexed_shards
    config = DataConfig(root, train=False, num_workers=2, image_size=16, batch_size=4)
    batches, skipped = _collect(config)
    seen = [(index, label) for b in batches for index, label in zip(_decode_indices(b), b.labels.tolist())]
    assert sorted(seen) == sorted(valid.items())
    assert skipped == expected_skips
    assert all(b.images.shape[1:] == (3, 16, 16) and b.images.dtype == torch.float32 for b in batches)
    assert all(b.labels.dtype == torch.int64 for b in batches)
    # One ordered pass: the same batches again, bit for bit.
    again, _ = _collect(config)
    assert len(again) == len(batches) and all(torch.equal(a.images, b.images) for a, b in zip(again, batches))


def test_train_passes_and_seeded_shuffles(indexed_shards):
    root, valid, expected_skips = indexed_shards

    def first_indices(seed: int, workers: int = 0) -> list[int]:
        batches, _ = _collect(DataConfig(root, seed=seed, num_workers=workers, image_size=16, batch_size=8,
                                         min_crop_scale=1.0), limit=3)
        return [i for b in batches for i in _decode_indices(b)]

    assert first_indices(0) == first_indices(0)
    assert first_indices(0) != first_indices(1)
    # Endless passes: with two workers, keep reading until both finished a pass over their shares.
    skipped, rows = Counter(), 0
    for batch in make_loader(DataConfig(root, num_workers=2, image_size=16, batch_size=8)):
        skipped.update(batch.skipped)
        rows += len(batch.labels)
        if batch.passes >= 2:
            break
    assert rows >= len(valid)  # at least one full pass was delivered before passes reached 2
    assert all(skipped[reason] >= count for reason, count in expected_skips.items())


def test_no_usable_rows(tmp_path):
    path = _write(tmp_path / "junk.parquet", [{"caption": "untitled", "image": _png(8, 8)}] * 3)
    with pytest.raises(RuntimeError, match="no usable rows"):
        next(make_loader(DataConfig(path, image_size=8)))
    assert list(make_loader(DataConfig(path, image_size=8, train=False))) == []


def test_config_validation():
    with pytest.raises(ValueError, match="min_crop_scale"):
        DataConfig("x", min_crop_scale=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig("x", batch_size=0)


# ------------------------------------------------------------------------------------------ demo dataset


def test_demo_dataset_schema_labels_and_determinism(tmp_path):
    demo = write_demo_dataset(tmp_path / "a", train_rows=400, eval_rows=40, image_size=32, num_shards=2, seed=3)
    assert demo.train_files == [str(tmp_path / "a" / "train" / f"part-{i:05d}.parquet") for i in range(2)]
    assert demo.eval_files == [str(tmp_path / "a" / "eval" / "part-00000.parquet")]
    assert demo.categories == [c.category for c in DEMO_CLASSES] and len(set(demo.categories)) == 10
    tables = [pq.read_table(f) for f in demo.train_files + demo.eval_files]
    assert all(t.schema.equals(PD_EXTENDED_SCHEMA) for t in tables)  # exact schema, no label column
    assert sum(t.num_rows for t in tables[:2]) == 400 and tables[2].num_rows == 40

    table = pa.concat_tables(tables)
    labels = [classify_caption(c) for c in table.column("caption").to_pylist()]
    assert {CATEGORIES[i] for i in labels if i is not None} == set(demo.categories)
    assert 0 < labels.count(None) < 0.06 * len(labels)
    decoded = 0
    for row in table.select(["image", "mime_type", "width", "height"]).to_pylist():
        try:
            image = Image.open(io.BytesIO(row["image"]["bytes"]))
            image.load()
        except OSError:
            continue
        decoded += 1
        assert image.size == (row["width"], row["height"]) and min(image.size) == 32
        assert Image.MIME[image.format] == row["mime_type"]
    assert 0.95 * table.num_rows < decoded < table.num_rows  # ~1% corrupt on purpose
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids)

    # Every demo noun, singular and plural, reaches its category.
    for cls in DEMO_CLASSES:
        for singular, plural in cls.nouns:
            assert classify_caption(f"a photo of {singular}") == CATEGORY_INDEX[cls.category], singular
            assert classify_caption(f"two {plural}") == CATEGORY_INDEX[cls.category], plural

    again = write_demo_dataset(tmp_path / "b", train_rows=400, eval_rows=40, image_size=32, num_shards=2, seed=3)
    assert all(pq.read_table(x).equals(pq.read_table(y)) for x, y in zip(demo.train_files, again.train_files))
    other = write_demo_dataset(tmp_path / "c", train_rows=400, eval_rows=40, image_size=32, num_shards=2, seed=4)
    assert not pq.read_table(other.train_files[0]).equals(tables[0])

    # The loader's counters see the unusable rows.
    _, skipped = _collect(DataConfig(demo.train_files, train=False, image_size=32, batch_size=64))
    assert skipped["no_label"] > 0 and skipped["corrupt_image"] > 0


def test_demo_cli(tmp_path, capsys):
    demo_main(["--out", str(tmp_path), "--train-rows", "20", "--eval-rows", "10", "--image-size", "32"])
    out = capsys.readouterr().out
    assert "train: 20 rows in 4 files" in out and "eval:  10 rows" in out and "dog" in out
    assert len(resolve_files(tmp_path / "train")) == 4 and len(resolve_files(tmp_path / "eval")) == 1
