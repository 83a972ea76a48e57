"""Every data format the way a user meets it: real files, a real HTTP server on 127.0.0.1, `make_loader`.

jsonl / LAION URL lists and LAION-style parquet are downloaded from tests/http_fixtures.py's server (good
images in distinct colours, so a test can tell which rows arrived, and every kind of failure); ImageNet-
style parquet, ImageFolders, broken files, the ``--labels`` join and resuming inside a shard use files
under tmp_path. Evaluation mode (``train=False``) reads shards in order, so those assertions are exact
lists; URL rows come out of the fetch stage in completion order, so those are compared as multisets.
Fetch timeouts are 0.5 s and images at most 24 px, so the file runs in seconds.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from http_fixtures import ImageServer, Route, refused_url
from PIL import Image

from convforever.data import IMAGENET_MEAN, IMAGENET_STD, PD_EXTENDED_SCHEMA, Batch, DataConfig, make_loader
from convforever.data.fetch import FetchConfig
from convforever.data.labels import CATEGORY_INDEX
from convforever.data.llm_labels import load_labels, write_labels_parquet
from convforever.data.loader import Lease, LocalShards
from convforever.data.shards import Shard, ShardUnreadable, is_image_folder, iter_shard, plan_dataset

FAST = FetchConfig(timeout=0.5, retries=1, backoff=0.05, concurrency=16)

RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)
DOG, CAT = CATEGORY_INDEX["dog"], CATEGORY_INDEX["cat"]


@pytest.fixture(autouse=True)
def _local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every request on 127.0.0.1: no proxy from the environment, and no ``datasets`` usage ping.

    ``datasets.load_dataset("parquet", ...)`` (how parquet shards are streamed) sends a HEAD request to
    s3.amazonaws.com for its download statistics on every call, with a 3 s timeout; without network that
    made a random test of this file take 5 s longer.
    """
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)


# ----------------------------------------------------------------------------------------------- helpers


def _png(colour: tuple[int, int, int], size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _colour(i: int) -> tuple[int, int, int]:
    """A distinct colour per row index, recovered by _colours."""
    return (8 * i, 255 - 8 * i, 100)


def _config(files: object = "", **overrides: object) -> DataConfig:
    settings: dict = {"train": False, "image_size": 16, "batch_size": 4, "fetch": FAST, **overrides}
    return DataConfig(files, **settings)  # type: ignore[arg-type]


def _colours(batch: Batch) -> list[tuple[int, int, int]]:
    """The (uniform) colour of each image, un-normalised back to 0..255."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = ((batch.images * std + mean) * 255).mean(dim=(2, 3))
    return [tuple(round(v) for v in row) for row in pixels.tolist()]  # type: ignore[misc]


def _samples(config: DataConfig, source: object = None) -> tuple[list[tuple[tuple[int, int, int], int]], Counter]:
    """Every (colour, label) the loader delivers, in delivery order, and the skips summed by reason."""
    samples, skipped = [], Counter()
    for batch in make_loader(config, source):  # type: ignore[arg-type]
        assert batch.images.shape[1:] == (3, config.image_size, config.image_size)
        samples += list(zip(_colours(batch), batch.labels.tolist()))
        skipped.update(batch.skipped)
    return samples, skipped


def _write_jsonl(path, lines: list[object]) -> str:
    """Objects become JSON lines; strings are written as they are (malformed lines)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return str(path)


def _write_pd(path, rows: list[dict], row_group_size: int = 1000) -> str:
    """PD-Extended rows from {id, caption, colour | image}; ids default to row-<i>."""
    n = len(rows)
    table = pa.Table.from_pydict({
        "id": [r.get("id", f"row-{i}") for i, r in enumerate(rows)],
        "source_id": [f"test:{i}" for i in range(n)],
        "caption": [r.get("caption") for r in rows],
        "image": [{"bytes": r.get("image") or _png(r["colour"]), "path": None} for r in rows],
        "mime_type": ["image/png"] * n,
        "aesthetic_score": [5.0] * n,
        "width": [20] * n,
        "height": [20] * n,
    }, schema=PD_EXTENDED_SCHEMA)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def _image_folder(root, layout: dict[str, list[tuple[str, bytes]]]) -> str:
    """{class dir: [(relative file name, bytes)]} under root."""
    for class_dir, files in layout.items():
        for name, data in files:
            path = root / class_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return str(root)


class _OneLease:
    """A ShardSource handing out one lease (as the coordinator does when another peer started the shard)
    and recording what the loader reports for it."""

    def __init__(self, lease: Lease) -> None:
        self.lease: Lease | None = lease
        self.completed: list[tuple[int, dict[str, int]]] = []

    def acquire(self, worker: int, num_workers: int) -> Lease | None:
        lease, self.lease = self.lease, None
        return lease

    def renew(self, lease: Lease, rows_done: int) -> bool:
        return True

    def complete(self, lease: Lease, used: int, skipped: dict[str, int]) -> None:
        self.completed.append((used, skipped))

    def release(self, lease: Lease, rows_done: int) -> None:
        raise AssertionError("the shard was read to its end")

    def max_empty_shards(self, worker: int, num_workers: int) -> int:
        return 1


# ---------------------------------------------------------------------------------------- 1. jsonl URLs


def test_jsonl_url_rows_every_outcome(tmp_path):
    routes = {
        "/red.png": Route(body=_png(RED)),
        "/green.png": Route(body=_png(GREEN)),
        "/blue.png": Route(body=_png(BLUE), fail_times=1),  # flaky: 500 once, then the image
        "/yellow.png": Route(body=_png(YELLOW, 24)),
        "/corrupt.jpg": Route(body=b"\xff\xd8\xff\xe0 not really a jpeg", content_type="image/jpeg"),
        "/always-500": Route(status=500, content_type="text/plain"),
        "/slow.png": Route(body=_png(WHITE), delay=5.0),  # far beyond the 0.5 s fetch timeout
        "/page.html": Route(body=b"<html>a dog</html>", content_type="text/html"),
    }
    with ImageServer(routes) as server:
        path = _write_jsonl(tmp_path / "urls.jsonl", [
            {"url": server.url("/red.png"), "label": "dog"},                       # label by name
            {"url": server.url("/green.png"), "caption": "a tabby cat asleep"},    # label from the caption
            {"url": server.url("/blue.png"), "caption": "a horse in a field"},     # arrives on the retry
            {"URL": server.url("/yellow.png"), "TEXT": "a sailing boat"},          # LAION's keys
            {"url": server.url("/red.png"), "label": 5, "caption": "a dog"},       # an int label beats the caption
            {"url": server.url("/corrupt.jpg"), "caption": "a dog"},               # corrupt_image
            {"url": server.url("/gone.png"), "caption": "a dog"},                  # url_not_found (404)
            {"url": server.url("/always-500"), "caption": "a dog"},                # url_http_error
            {"url": server.url("/slow.png"), "caption": "a dog"},                  # url_timeout
            {"url": server.url("/page.html"), "caption": "a dog"},                 # url_not_image
            {"url": refused_url(), "caption": "a dog"},                            # url_unreachable
            {"url": server.url("/green.png"), "caption": "untitled"},              # no_label: never downloaded
            {"url": server.url("/green.png"), "label": "unicorn"},                 # bad_label: never downloaded
            {"caption": "a dog", "id": "no-url"},                                  # no_image
            '{"url": "http://127.0.0.1:1/x.png", "caption": "a dog"',              # malformed JSON
        ])
        samples, skipped = _samples(_config(path))
        hits = dict(server.hits)

    assert Counter(samples) == Counter({
        (RED, DOG): 1, (GREEN, CAT): 1, (BLUE, CATEGORY_INDEX["ungulate"]): 1,
        (YELLOW, CATEGORY_INDEX["watercraft"]): 1, (RED, 5): 1,
    })
    # A malformed line has neither a label nor a caption, so it is counted where labelling drops it.
    assert skipped == {
        "corrupt_image": 1, "url_not_found": 1, "url_http_error": 1, "url_timeout": 1, "url_not_image": 1,
        "url_unreachable": 1, "no_label": 2, "bad_label": 1, "no_image": 1,
    }
    # Transient failures are tried twice (retries=1), permanent ones once; unlabelled rows cost no request.
    assert hits == {"/red.png": 2, "/green.png": 1, "/blue.png": 2, "/yellow.png": 1, "/corrupt.jpg": 1,
                    "/gone.png": 1, "/always-500": 2, "/slow.png": 2, "/page.html": 1}


def test_jsonl_rows_are_planned_and_read_as_lines(tmp_path):
    path = _write_jsonl(tmp_path / "laion.jsonl", [
        {"URL": "http://h/a.jpg", "TEXT": "a dog", "key": "000001"},
        {"image_url": "http://h/b.jpg", "text": "a cat", "id": 7},
        {"url": 5, "caption": ["not", "text"]},  # wrong types: no URL, no caption
        "[1, 2]",                                 # JSON, but not an object
    ])
    plan = plan_dataset(path, shard_rows=3)
    assert [(s.format, s.path, s.start, s.stop, s.num_rows) for s in plan.shards] == [
        ("jsonl", "laion.jsonl", 0, 3, 3), ("jsonl", "laion.jsonl", 3, 4, 1)]
    rows = [row for shard in plan.shards for row in iter_shard(plan.root, shard)]
    assert [tuple(r) for r in rows] == [
        ("000001", "a dog", None, None, "http://h/a.jpg"),
        ("7", "a cat", None, None, "http://h/b.jpg"),
        ("laion.jsonl:2", None, None, None, None),
        ("laion.jsonl:3", None, None, None, None),
    ]


def test_jsonl_line_numbers_agree_with_the_plan_despite_carriage_returns(tmp_path):
    """The plan counts b"\\n"; a reader splitting on a lone "\\r" too would shift every later line."""
    path = tmp_path / "cr.jsonl"
    path.write_bytes(b'{"url": "http://h/0.png", "label": "dog"}\r\n'     # Windows line end
                     b'{"url": "http://h/1.png", "caption": "a\rcat"}\n'  # a raw CR inside a string
                     b'{"url": "http://h/2.png", "label": "cat"}\n')
    plan = plan_dataset(str(path), shard_rows=2)
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 2), (2, 3)]
    rows = [row for shard in plan.shards for row in iter_shard(plan.root, shard)]
    assert [r.id for r in rows] == ["cr.jsonl:0", "cr.jsonl:1", "cr.jsonl:2"]
    assert rows[0].url == "http://h/0.png" and rows[2].url == "http://h/2.png" and rows[2].label == "cat"
    assert rows[1].url is None  # a raw control character in a JSON string is not JSON: a malformed line


def test_jsonl_urls_in_training_mode_every_pass_has_every_row(tmp_path):
    colours = [RED, GREEN, BLUE]
    with ImageServer({f"/{i}.png": Route(body=_png(c)) for i, c in enumerate(colours)}) as server:
        path = _write_jsonl(tmp_path / "t.jsonl", [{"url": server.url(f"/{i}.png"), "label": i} for i in range(3)]
                            + [{"url": server.url("/gone.png"), "label": 0}])
        passes: dict[int, Counter] = {}
        skipped: Counter = Counter()
        for batch in make_loader(_config(path, train=True, batch_size=1, min_crop_scale=1.0)):
            skipped.update(batch.skipped)
            passes.setdefault(batch.passes, Counter()).update(batch.labels.tolist())
            if batch.passes >= 2:
                break
    assert passes[0] == passes[1] == Counter({0: 1, 1: 1, 2: 1})
    assert skipped["url_not_found"] >= 2


# --------------------------------------------------------------------------------------- 2. LAION parquet


def test_laion_parquet_url_and_caption(tmp_path):
    routes = {"/red.png": Route(body=_png(RED)), "/green.png": Route(body=_png(GREEN)),
              "/blue.png": Route(body=_png(BLUE)), "/page": Route(body=b"<html/>", content_type="text/html")}
    with ImageServer(routes) as server:
        pq.write_table(pa.table({
            "url": [server.url(p) for p in ("/red.png", "/green.png", "/gone.png", "/page", "/red.png")],
            "caption": ["a dog on a beach", "a tabby cat", "a dog", "a dog", "untitled"],
            "similarity": [0.3] * 5,  # LAION's other metadata columns are ignored
            "NSFW": ["UNLIKELY"] * 5,
        }), tmp_path / "laion-0.parquet", row_group_size=2)
        pq.write_table(pa.table({"URL": [server.url("/blue.png"), None], "TEXT": ["a horse", "a dog"]}),
                       tmp_path / "laion-1.parquet")
        plan = plan_dataset(str(tmp_path), shard_rows=100)
        assert [(s.format, s.path, s.num_rows) for s in plan.shards] == [
            ("parquet", "laion-0.parquet", 5), ("parquet", "laion-1.parquet", 2)]
        rows = list(iter_shard(plan.root, plan.shards[0]))
        assert [(r.image, r.url, r.caption) for r in rows[:2]] == [
            (None, server.url("/red.png"), "a dog on a beach"), (None, server.url("/green.png"), "a tabby cat")]
        samples, skipped = _samples(_config(str(tmp_path)))
    assert Counter(samples) == Counter({(RED, DOG): 1, (GREEN, CAT): 1, (BLUE, CATEGORY_INDEX["ungulate"]): 1})
    assert skipped == {"url_not_found": 1, "url_not_image": 1, "no_label": 1, "no_image": 1}


# ------------------------------------------------------------------------------------ 3. ImageNet parquet


def _write_imagenet(path, labels: list, label_type: pa.DataType | None = None) -> str:
    """``image`` struct + ``label``, no caption, with the Hub's ``datasets`` features metadata."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})
    schema = features.arrow_schema
    schema = schema.set(schema.get_field_index("label"), pa.field("label", label_type or pa.int64()))
    table = pa.Table.from_pydict({
        "image": [{"bytes": _png(_colour(i), 16), "path": f"{i}.png"} for i in range(len(labels))],
        "label": labels,
    }, schema=schema)
    pq.write_table(table, path, row_group_size=3)
    return str(path)


def test_imagenet_parquet_labels_beyond_the_fifty_categories(tmp_path):
    labels = [0, 49, 50, 500, 999, 7, 1000, -1]
    path = _write_imagenet(tmp_path / "train-00000-of-00001.parquet", labels)

    samples, skipped = _samples(_config(path, num_classes=1000))
    assert samples == [(_colour(i), labels[i]) for i in range(6)]
    assert skipped == {"bad_label": 2}  # 1000 and -1 (ImageNet's unlabelled test rows)

    samples, skipped = _samples(_config(path))  # the default: the 50 categories
    assert samples == [(_colour(0), 0), (_colour(1), 49), (_colour(5), 7)]
    assert skipped == {"bad_label": 5}


def test_imagenet_parquet_with_a_float_label_column(tmp_path):
    """pandas writes an int column with nulls as float64: 500.0 is class 500, a null has nothing to fall on."""
    path = _write_imagenet(tmp_path / "pandas.parquet", [3.0, 50.0, 999.0, None, 2.5], label_type=pa.float64())
    samples, skipped = _samples(_config(path, num_classes=1000))
    assert samples == [(_colour(0), 3), (_colour(1), 50), (_colour(2), 999)]
    assert skipped == {"no_label": 1, "bad_label": 1}


# ------------------------------------------------------------------------------------------ 4. ImageFolder


def test_image_folder_named_by_category(tmp_path):
    root = _image_folder(tmp_path / "pets", {
        "dog": [("a.png", _png(_colour(0))), ("puppies/b.png", _png(_colour(1))), ("readme.txt", b"not an image")],
        "cat": [("a.jpg", _png(_colour(2))), ("broken.png", b"\x89PNG\r\n\x1a\n truncated"),
                ("c.PNG", _png(_colour(3)))],
    })
    assert is_image_folder(root)
    plan = plan_dataset(root)
    assert [(s.format, s.path, s.files, s.labels) for s in plan.shards] == [(
        "imagefolder", "", ("cat/a.jpg", "cat/broken.png", "cat/c.PNG", "dog/a.png", "dog/puppies/b.png"),
        (CAT, CAT, CAT, DOG, DOG))]
    samples, skipped = _samples(_config(root))
    assert samples == [(_colour(2), CAT), (_colour(3), CAT), (_colour(0), DOG), (_colour(1), DOG)]
    assert skipped == {"corrupt_image": 1}


def test_image_folder_arbitrary_names_sharded_in_a_stable_order(tmp_path):
    root = _image_folder(tmp_path / "data", {
        "b_class": [(f"{i}.png", _png(_colour(i))) for i in range(3)],
        "a_class": [(f"{i}.png", _png(_colour(10 + i))) for i in range(2)],
    })
    plan = plan_dataset(root, shard_rows=2)
    assert [(s.start, s.stop, s.num_rows, s.files, s.labels) for s in plan.shards] == [
        (0, 2, 2, ("a_class/0.png", "a_class/1.png"), (0, 0)),
        (2, 4, 2, ("b_class/0.png", "b_class/1.png"), (1, 1)),
        (4, 5, 1, ("b_class/2.png",), (1,)),
    ]
    expected = [(_colour(10), 0), (_colour(11), 0), (_colour(0), 1), (_colour(1), 1), (_colour(2), 1)]
    config = _config(root, shard_rows=2, batch_size=2)
    assert _samples(config) == (expected, Counter())
    assert _samples(config) == (expected, Counter())  # the same order on every evaluation
    # Two workers split the shards between them; every file still arrives exactly once.
    samples, _ = _samples(_config(root, shard_rows=2, batch_size=2, num_workers=2))
    assert sorted(samples) == sorted(expected)


def test_data_files_beside_a_folder_of_images_are_not_an_image_folder(tmp_path):
    """A dataset directory with an assets/ folder of pictures is its parquet data, not a 1-image ImageFolder."""
    _write_pd(tmp_path / "train.parquet", [{"caption": "a dog", "colour": RED}, {"caption": "a cat", "colour": GREEN}])
    _image_folder(tmp_path, {"assets": [("banner.png", _png(BLUE))]})
    assert not is_image_folder(str(tmp_path))
    assert [(s.format, s.path) for s in plan_dataset(str(tmp_path)).shards] == [("parquet", "train.parquet")]
    assert _samples(_config(str(tmp_path))) == ([(RED, DOG), (GREEN, CAT)], Counter())


# ------------------------------------------------------------------------------------------ 5. bad files


def test_truncated_and_unusable_parquet_files_are_left_out_of_the_plan(tmp_path, caplog):
    _write_pd(tmp_path / "a-good.parquet", [{"caption": "a dog", "colour": RED}, {"caption": "a cat", "colour": GREEN}])
    data = (tmp_path / "a-good.parquet").read_bytes()
    (tmp_path / "b-truncated.parquet").write_bytes(data[: len(data) // 2])
    pq.write_table(pa.table({"id": ["x"], "caption": ["a dog"], "width": [3]}), tmp_path / "c-no-image.parquet")
    pq.write_table(pa.table({"url": ["http://h/x.png"], "width": [3]}), tmp_path / "d-no-caption.parquet")

    with caplog.at_level(logging.WARNING, logger="convforever.data.shards"):
        plan = plan_dataset(str(tmp_path))
    assert [s.path for s in plan.shards] == ["a-good.parquet"]
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "b-truncated.parquet is not a readable parquet file" in warnings
    assert "c-no-image.parquet has neither an 'image' struct" in warnings
    assert "d-no-caption.parquet has no 'label' and no 'caption' column" in warnings
    # Training and evaluation both go on with the good file.
    assert _samples(_config(str(tmp_path))) == ([(RED, DOG), (GREEN, CAT)], Counter())
    batch = next(iter(make_loader(_config(str(tmp_path), train=True, batch_size=2))))
    assert sorted(batch.labels.tolist()) == [DOG, CAT]

    for name in ("a-good.parquet", "b-truncated.parquet"):
        (tmp_path / name).unlink()
    with pytest.raises(ValueError, match=r"none of the 2 files of .* has a readable row: .*no-image"):
        plan_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="none of the 2 files"):
        make_loader(_config(str(tmp_path), train=True))


def _garble_row_group(path, group: int) -> None:
    """Overwrite the page headers of one row group's column chunks; the footer stays readable."""
    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for c in range(meta.num_columns):
        column = meta.row_group(group).column(c)
        start = column.dictionary_page_offset or column.data_page_offset
        data[start:start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted", "fewer_row_groups", "garbled_pages"])
def test_file_broken_after_planning_skips_its_shard(tmp_path, damage):
    a = tmp_path / "a.parquet"
    _write_pd(a, [{"caption": "a dog", "colour": _colour(i)} for i in range(4)], row_group_size=2)
    _write_pd(tmp_path / "b.parquet", [{"caption": "a cat", "colour": _colour(10 + i)} for i in range(3)])
    plan = plan_dataset(str(tmp_path), shard_rows=100)
    assert [(s.path, s.num_rows) for s in plan.shards] == [("a.parquet", 4), ("b.parquet", 3)]

    arrives_from_a = []
    if damage == "garbage":
        a.write_bytes(b"this is not parquet at all" * 50)
    elif damage == "truncated":
        a.write_bytes(a.read_bytes()[:300])
    elif damage == "deleted":
        a.unlink()
    elif damage == "fewer_row_groups":  # rewritten since planning: the planned row groups are not there
        _write_pd(a, [{"caption": "a dog", "colour": _colour(i)} for i in range(4)], row_group_size=4)
    else:  # the second row group cannot be decoded: the first one's rows still arrive
        _garble_row_group(a, 1)
        arrives_from_a = [(_colour(0), DOG), (_colour(1), DOG)]

    samples, skipped = _samples(_config(), LocalShards(plan, train=False, seed=0))
    assert samples == arrives_from_a + [(_colour(10 + i), CAT) for i in range(3)]
    assert skipped == {"bad_file": 4 - len(arrives_from_a)}

    # A training loader keeps going on the readable shard, pass after pass, counting the broken one each time.
    skipped, labels = Counter(), Counter()
    for batch in make_loader(_config(train=True, batch_size=3), LocalShards(plan, train=True, seed=0)):
        skipped.update(batch.skipped)
        labels.update(batch.labels.tolist())
        if batch.passes >= 3:
            break
    assert labels[CAT] >= 9 and set(labels) <= {DOG, CAT}
    assert set(skipped) == {"bad_file"} and skipped["bad_file"] >= 3 * (4 - len(arrives_from_a))


def test_iter_shard_raises_shard_unreadable_with_a_reason(tmp_path):
    path = _write_pd(tmp_path / "x.parquet", [{"caption": "a dog", "colour": RED}])
    plan = plan_dataset(path)
    (tmp_path / "x.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ShardUnreadable) as error:
        list(iter_shard(plan.root, plan.shards[0]))
    assert error.value.reason == "bad_file" and "x.parquet" in str(error.value)
    jsonl = Shard("jsonl", "gone.jsonl", 0, 3, 3)
    with pytest.raises(ShardUnreadable) as error:
        list(iter_shard(str(tmp_path), jsonl))
    assert error.value.reason == "bad_file"


# -------------------------------------------------------------------------------------- 6. --labels join


def test_labels_dataset_overrides_captions_by_id(tmp_path):
    data = _write_pd(tmp_path / "data.parquet", [
        {"id": "p0", "caption": "a dog", "colour": _colour(0)},         # in the map: cat, whatever the caption says
        {"id": "p1", "caption": "a dog", "colour": _colour(1)},         # in the map: 40
        {"id": "p2", "caption": "a dog", "colour": _colour(2)},         # left unlabelled by the labeller: caption
        {"id": "p3", "caption": "a tabby cat", "colour": _colour(3)},   # not in the map: caption
        {"id": "p4", "caption": "untitled", "colour": _colour(4)},      # the map labels what the caption cannot
        {"id": "p5", "caption": "untitled", "colour": _colour(5)},      # neither: no_label
    ])
    labels = tmp_path / "labels" / "labels.parquet"
    write_labels_parquet({"p0": CAT, "p1": 40, "p2": None, "p4": 7, "elsewhere": 3}, labels)
    assert pq.read_schema(labels).names[:2] == ["id", "label"]
    assert load_labels(labels) == {"p0": CAT, "p1": 40, "p4": 7, "elsewhere": 3}

    expected = [(_colour(0), CAT), (_colour(1), 40), (_colour(2), DOG), (_colour(3), CAT), (_colour(4), 7)]
    for where in (labels, labels.parent):  # the file, or the directory holding it
        assert _samples(_config(data, labels=str(where))) == (expected, Counter({"no_label": 1}))
    assert _samples(_config(data)) == (
        [(_colour(0), DOG), (_colour(1), DOG), (_colour(2), DOG), (_colour(3), CAT)], Counter({"no_label": 2}))


def test_labels_dataset_joins_jsonl_keys(tmp_path):
    with ImageServer({"/red.png": Route(body=_png(RED)), "/green.png": Route(body=_png(GREEN))}) as server:
        data = _write_jsonl(tmp_path / "urls.jsonl", [
            {"key": "k0", "URL": server.url("/red.png"), "TEXT": "a dog"},
            {"key": "k1", "URL": server.url("/green.png"), "TEXT": "a dog"},
        ])
        labels = tmp_path / "labels.parquet"
        write_labels_parquet({"k1": 44}, labels)
        samples, skipped = _samples(_config(data, labels=str(labels)))
    assert Counter(samples) == Counter({(RED, DOG): 1, (GREEN, 44): 1}) and skipped == Counter()


# ------------------------------------------------------------------------------------ 7. resume in a shard


def test_resume_inside_a_parquet_shard_spanning_row_groups(tmp_path):
    path = _write_pd(tmp_path / "x.parquet", [{"caption": "a dog", "colour": _colour(i)} for i in range(10)],
                     row_group_size=3)
    plan = plan_dataset(path, shard_rows=5)  # row groups of 3, 3, 3, 1 -> shards of 6 and 4 rows
    assert [(s.start, s.stop, s.num_rows) for s in plan.shards] == [(0, 2, 6), (2, 4, 4)]
    first = 0
    for shard in plan.shards:
        for k in range(shard.num_rows + 1):
            assert [r.id for r in iter_shard(plan.root, shard, start_row=k)] == \
                [f"row-{i}" for i in range(first + k, first + shard.num_rows)], (shard.key, k)
        first += shard.num_rows


def test_resume_inside_jsonl_and_image_folder_shards(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"id": f"j{i}", "url": f"http://h/{i}.png"} for i in range(7)])
    plan = plan_dataset(path, shard_rows=3)
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 3), (3, 6), (6, 7)]
    for shard in plan.shards:
        for k in range(shard.num_rows + 1):
            assert [r.id for r in iter_shard(plan.root, shard, start_row=k)] == \
                [f"j{i}" for i in range(shard.start + k, shard.stop)], (shard.key, k)

    images = {f"{i}.png": _png(_colour(i)) for i in range(5)}
    root = _image_folder(tmp_path / "folder", {"dog": list(images.items())})
    plan = plan_dataset(root, shard_rows=3)
    assert [s.files for s in plan.shards] == [("dog/0.png", "dog/1.png", "dog/2.png"), ("dog/3.png", "dog/4.png")]
    for shard in plan.shards:
        for k in range(shard.num_rows + 1):
            rows = list(iter_shard(plan.root, shard, start_row=k))
            assert [r.id for r in rows] == list(shard.files[k:])
            assert all(r.label == DOG and r.image == images[r.id.split("/")[1]] for r in rows)


def test_loader_resumes_a_lease_from_its_start_row(tmp_path):
    path = _write_pd(tmp_path / "x.parquet", [{"caption": "a dog" if i != 5 else "untitled", "colour": _colour(i)}
                                               for i in range(8)], row_group_size=3)
    plan = plan_dataset(path)
    source = _OneLease(Lease(plan.shards[0], plan.root, lease_id="lease-1", start_row=4))
    samples, skipped = _samples(_config(), source)
    assert samples == [(_colour(i), DOG) for i in (4, 6, 7)] and skipped == {"no_label": 1}
    assert source.completed == [(3, {"no_label": 1})]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_goes_on_beside_a_file_with_no_labelled_row(tmp_path, seed):
    """A share of [good file, file whose captions name no category]: the worker must not give up on it."""
    _write_pd(tmp_path / "a.parquet", [{"caption": "a dog", "colour": _colour(i)} for i in range(3)])
    _write_pd(tmp_path / "b.parquet", [{"caption": "abstract composition", "colour": RED} for _ in range(3)])
    skipped, labels = Counter(), Counter()
    for batch in make_loader(_config(str(tmp_path), train=True, batch_size=3, seed=seed)):
        skipped.update(batch.skipped)
        labels.update(batch.labels.tolist())
        if batch.passes >= 6:
            break
    # Six complete passes: each delivered the good file's 3 rows and skipped the other file's 3.
    assert set(labels) == {DOG} and labels[DOG] >= 18
    assert set(skipped) == {"no_label"} and skipped["no_label"] >= 15
