"""A small synthetic dataset in the PD-Extended schema, for demos, tests and smoke runs without internet.

Ten categories, each with its own visual signature (shape + colour + texture), drawn at a random position
and size over a random gradient background with distractor strokes and sensor noise, so a small ConvNeXt
must learn shapes and colours rather than a single pixel. Labels come from the captions, exactly as with
real PD-Extended data; about 2% of captions name no category and about 1% of images are corrupt, so the
loader's skip counters have something to count. Everything is a function of ``seed``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from .parquet import PD_EXTENDED_SCHEMA

logger = logging.getLogger(__name__)

ROW_GROUP_ROWS = 128  # several row groups per shard, so DataLoader workers have units to split
NO_LABEL_FRACTION = 0.02
CORRUPT_FRACTION = 0.01

Shape = Callable[[ImageDraw.ImageDraw, float, float, float], None]


@dataclass(frozen=True)
class DemoClass:
    """One category's look and the nouns its captions use, as (singular, plural)."""

    category: str
    colour: tuple[int, int, int]
    texture: str  # solid | stripes_h | stripes_v | dots | windows
    shape: Shape
    nouns: tuple[tuple[str, str], ...]
    detail: Shape | None = None  # drawn on top in a second colour
    detail_colour: tuple[int, int, int] = (0, 0, 0)


def _circle(d: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: int | tuple = 255) -> None:
    d.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _dog(d, x, y, r):
    _circle(d, x, y, r)
    d.ellipse((x - 1.25 * r, y - 0.9 * r, x - 0.6 * r, y + 0.2 * r), fill=255)  # floppy ears
    d.ellipse((x + 0.6 * r, y - 0.9 * r, x + 1.25 * r, y + 0.2 * r), fill=255)


def _cat(d, x, y, r):
    d.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=255)


def _bird(d, x, y, r):
    d.line([(x - r, y - 0.6 * r), (x, y + 0.4 * r), (x + r, y - 0.6 * r)], fill=255, width=max(2, int(r / 2.5)))


def _fish(d, x, y, r):
    d.ellipse((x - r, y - 0.5 * r, x + 0.6 * r, y + 0.5 * r), fill=255)
    d.polygon([(x + 0.4 * r, y), (x + r, y - 0.5 * r), (x + r, y + 0.5 * r)], fill=255)


def _flower(d, x, y, r):
    for k in range(6):
        angle = k * np.pi / 3
        _circle(d, x + 0.55 * r * np.cos(angle), y + 0.55 * r * np.sin(angle), 0.42 * r)


def _flower_centre(d, x, y, r):
    _circle(d, x, y, 0.3 * r, fill=(245, 215, 40))


def _fruit(d, x, y, r):
    _circle(d, x, y + 0.1 * r, 0.85 * r)


def _fruit_leaf(d, x, y, r):
    d.ellipse((x, y - 1.05 * r, x + 0.6 * r, y - 0.7 * r), fill=(40, 160, 50))
    _circle(d, x - 0.35 * r, y - 0.2 * r, 0.15 * r, fill=(250, 235, 235))


def _vehicle(d, x, y, r):
    d.rectangle((x - r, y - 0.45 * r, x + r, y + 0.35 * r), fill=255)
    d.rectangle((x - 0.5 * r, y - 0.85 * r, x + 0.45 * r, y - 0.4 * r), fill=255)


def _wheels(d, x, y, r):
    _circle(d, x - 0.55 * r, y + 0.4 * r, 0.28 * r, fill=(15, 15, 15))
    _circle(d, x + 0.55 * r, y + 0.4 * r, 0.28 * r, fill=(15, 15, 15))


def _hull(d, x, y, r):
    d.polygon([(x - r, y + 0.3 * r), (x + r, y + 0.3 * r), (x + 0.6 * r, y + 0.8 * r), (x - 0.6 * r, y + 0.8 * r)],
              fill=255)


def _sail(d, x, y, r):
    d.polygon([(x - 0.05 * r, y - r), (x - 0.05 * r, y + 0.25 * r), (x - 0.8 * r, y + 0.25 * r)],
              fill=(245, 245, 240))
    d.polygon([(x + 0.05 * r, y - 0.8 * r), (x + 0.05 * r, y + 0.25 * r), (x + 0.6 * r, y + 0.25 * r)],
              fill=(220, 40, 40))


def _building(d, x, y, r):
    d.rectangle((x - 0.5 * r, y - r, x + 0.5 * r, y + r), fill=255)


def _mushroom(d, x, y, r):
    d.pieslice((x - r, y - 0.9 * r, x + r, y + 0.7 * r), 180, 360, fill=255)


def _stem(d, x, y, r):
    d.rectangle((x - 0.22 * r, y - 0.12 * r, x + 0.22 * r, y + 0.9 * r), fill=(235, 230, 215))


DEMO_CLASSES: tuple[DemoClass, ...] = (
    DemoClass("dog", (140, 90, 45), "dots", _dog,
              (("dog", "dogs"), ("puppy", "puppies"), ("terrier", "terriers"),
               ("golden retriever", "golden retrievers"), ("poodle", "poodles"), ("beagle", "beagles"),
               ("labrador", "labradors"))),
    DemoClass("cat", (150, 150, 160), "stripes_h", _cat,
              (("cat", "cats"), ("kitten", "kittens"), ("tabby cat", "tabby cats"), ("kitty", "kitties"))),
    DemoClass("bird", (235, 200, 35), "solid", _bird,
              (("bird", "birds"), ("parrot", "parrots"), ("pigeon", "pigeons"), ("penguin", "penguins"),
               ("flamingo", "flamingos"))),
    DemoClass("fish", (240, 125, 25), "stripes_v", _fish,
              (("fish", "fish"), ("goldfish", "goldfish"), ("salmon", "salmon"), ("koi", "koi"),
               ("trout", "trout"), ("clownfish", "clownfish"))),
    DemoClass("flower", (215, 60, 175), "solid", _flower,
              (("flower", "flowers"), ("rose", "roses"), ("tulip", "tulips"), ("daisy", "daisies"),
               ("orchid", "orchids")), _flower_centre),
    DemoClass("fruit", (205, 30, 40), "solid", _fruit,
              (("apple", "apples"), ("cherry", "cherries"), ("plum", "plums"), ("pomegranate", "pomegranates"),
               ("piece of fruit", "pieces of fruit")), _fruit_leaf),
    DemoClass("vehicle", (40, 80, 205), "solid", _vehicle,
              (("car", "cars"), ("truck", "trucks"), ("van", "vans"), ("vintage car", "vintage cars"),
               ("bus", "buses")), _wheels),
    DemoClass("watercraft", (115, 70, 30), "solid", _hull,
              (("boat", "boats"), ("sailboat", "sailboats"), ("yacht", "yachts"), ("sailing ship", "sailing ships")),
              _sail),
    DemoClass("building", (205, 185, 140), "windows", _building,
              (("house", "houses"), ("building", "buildings"), ("cottage", "cottages"), ("skyscraper", "skyscrapers"),
               ("apartment block", "apartment blocks"))),
    DemoClass("fungus", (200, 40, 30), "dots", _mushroom,
              (("mushroom", "mushrooms"), ("toadstool", "toadstools"), ("fungus", "fungi"),
               ("wild mushroom", "wild mushrooms")), _stem),
)

_TEMPLATES = (
    "a photo of {a} {noun}", "a photo of {count} {nouns} {place}", "close-up of {a} {noun}", "{A} {noun} {place}",
    "an old photograph of {a_adj} {adj} {noun}", "{Noun}, public domain image",
    "watercolor painting of {a} {noun} {place}",
    "vintage illustration: {nouns}", "{count} {adj} {nouns}", "{a_adj} {adj} {noun} {place}",
)
_PLACES = ("on grass", "in the park", "at dusk", "in the snow", "on a sunny day", "in the garden", "near a lake",
           "in the rain", "at night", "")
_ADJECTIVES = ("small", "large", "old", "young", "beautiful", "bright", "lonely", "colourful")
_COUNTS = ("two", "three", "four", "several", "a group of")
_NO_MATCH = ("untitled", "IMG_{n}.JPG", "abstract composition no. {n}", "scan of page {n}",
             "public domain image {n}", "blurry photograph", "texture study", "archive item {n}, unknown subject")


@dataclass(frozen=True)
class DemoDataset:
    """What ``write_demo_dataset`` wrote."""

    train_files: list[str]
    eval_files: list[str]
    categories: list[str]


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _caption(cls: DemoClass, rng: np.random.Generator) -> str:
    singular, plural = cls.nouns[rng.integers(len(cls.nouns))]
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    adjective = _ADJECTIVES[rng.integers(len(_ADJECTIVES))]
    caption = template.format(a=_article(singular), A=_article(singular).capitalize(), a_adj=_article(adjective),
                              noun=singular, nouns=plural, Noun=singular.capitalize(), adj=adjective,
                              count=_COUNTS[rng.integers(len(_COUNTS))], place=_PLACES[rng.integers(len(_PLACES))])
    return caption.strip()


def _texture(kind: str, height: int, width: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """A (H, W) brightness multiplier: the class's surface pattern."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    period = max(3.0, scale / 2.5)
    phase = rng.uniform(0, period)
    if kind == "stripes_h":
        return np.where(((yy + phase) // (period / 2)) % 2 == 0, 1.0, 0.45)
    if kind == "stripes_v":
        return np.where(((xx + phase) // (period / 2)) % 2 == 0, 1.0, 0.45)
    if kind == "windows":
        cell = max(3.0, scale / 3)
        inside = ((xx + phase) % cell > cell * 0.45) & ((yy + phase) % cell > cell * 0.45)
        return np.where(inside, 0.3, 1.0)
    if kind == "dots":
        out = np.ones((height, width), np.float32)
        for _ in range(int(rng.integers(4, 8))):
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            radius = rng.uniform(0.06, 0.12) * scale * 2
            out[(xx - cx) ** 2 + (yy - cy) ** 2 < radius ** 2] = 0.3 if rng.random() < 0.7 else 1.6
        return out
    return np.ones((height, width), np.float32)


def _render(cls: DemoClass, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    side = min(width, height)
    # Background: a random two-colour gradient plus a few distractor strokes.
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    t = np.linspace(0, 1, height if rng.random() < 0.5 else width, dtype=np.float32)
    ramp = t[:, None, None] if len(t) == height else t[None, :, None]
    canvas = np.broadcast_to(c0 + (c1 - c0) * ramp, (height, width, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(canvas))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(points, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))

    # The object: a class-shaped mask filled with the jittered class colour times its texture.
    r = rng.uniform(0.2, 0.38) * side
    x, y = rng.uniform(0.3 * width, 0.7 * width), rng.uniform(0.3 * height, 0.7 * height)
    mask = Image.new("L", (width, height), 0)
    cls.shape(ImageDraw.Draw(mask), x, y, r)
    colour = np.clip(np.array(cls.colour, np.float32) + rng.uniform(-30, 30, 3), 0, 255) * rng.uniform(0.8, 1.15)
    fill = np.clip(colour[None, None, :] * _texture(cls.texture, height, width, r, rng)[..., None], 0, 255)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = np.where(np.asarray(mask)[..., None] > 127, fill, pixels)
    image = Image.fromarray(pixels.astype(np.uint8))
    if cls.detail is not None:
        cls.detail(ImageDraw.Draw(image), x, y, r)
    noise = rng.normal(0, rng.uniform(3, 12), (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    if rng.random() < 0.8:
        image.save(buffer, format="JPEG", quality=int(rng.integers(75, 96)))
        return buffer.getvalue(), "image/jpeg"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def _rows(count: int, image_size: int, split: str, rng: np.random.Generator) -> dict[str, list]:
    columns: dict[str, list] = {name: [] for name in PD_EXTENDED_SCHEMA.names}
    aspects = ((1.0, 1.0), (1.25, 1.0), (1.0, 1.25), (1.5, 1.0))
    for index in range(count):
        cls = DEMO_CLASSES[rng.integers(len(DEMO_CLASSES))]
        aspect_w, aspect_h = aspects[rng.integers(len(aspects))]
        width, height = round(image_size * aspect_w), round(image_size * aspect_h)
        data, mime = _encode(_render(cls, width, height, rng), rng)
        if rng.random() < NO_LABEL_FRACTION:
            caption = _NO_MATCH[rng.integers(len(_NO_MATCH))].format(n=int(rng.integers(1000, 9999)))
        else:
            caption = _caption(cls, rng)
        if rng.random() < CORRUPT_FRACTION:
            # Half truncated mid-stream (a partial download), half garbage behind a valid magic number.
            data = data[: len(data) // 3] if rng.random() < 0.5 else data[:8] + rng.bytes(len(data) // 2)
        columns["id"].append(str(uuid.UUID(bytes=rng.bytes(16), version=4)))
        columns["source_id"].append(f"synthetic:{split}:{index:06d}")
        columns["caption"].append(caption)
        columns["image"].append({"bytes": data, "path": None})
        columns["mime_type"].append(mime)
        columns["aesthetic_score"].append(round(float(np.clip(rng.normal(5.6, 0.7), 1.0, 10.0)), 4))
        columns["width"].append(width)
        columns["height"].append(height)
    return columns


def _write(path: Path, columns: dict[str, list]) -> str:
    table = pa.Table.from_pydict(columns, schema=PD_EXTENDED_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".tmp-{os.getpid()}")
    pq.write_table(table, partial, row_group_size=ROW_GROUP_ROWS)
    os.replace(partial, path)  # a concurrent reader never sees a half-written shard
    return str(path)


def write_demo_dataset(out_dir: str | os.PathLike, *, train_rows: int = 2000, eval_rows: int = 400,
                       image_size: int = 64, num_shards: int = 4, seed: int = 0) -> DemoDataset:
    """Write ``out_dir/train/part-0000N.parquet`` (num_shards files) and ``out_dir/eval/part-00000.parquet``."""
    if train_rows < 1 or eval_rows < 1 or num_shards < 1:
        raise ValueError(f"train_rows={train_rows}, eval_rows={eval_rows}, num_shards={num_shards}: all must be >= 1")
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: the demo shapes need at least 16 pixels")
    out = Path(out_dir)
    train = _rows(train_rows, image_size, "train", np.random.default_rng([seed, 0]))
    bounds = np.linspace(0, train_rows, num_shards + 1).round().astype(int)
    train_files = [_write(out / "train" / f"part-{i:05d}.parquet", {k: v[lo:hi] for k, v in train.items()})
                   for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo]
    eval_files = [_write(out / "eval" / "part-00000.parquet",
                         _rows(eval_rows, image_size, "eval", np.random.default_rng([seed, 1])))]
    categories = [cls.category for cls in DEMO_CLASSES]
    logger.info("wrote demo dataset to %s: %d train rows in %d files, %d eval rows", out, train_rows,
                len(train_files), eval_rows)
    return DemoDataset(train_files=train_files, eval_files=eval_files, categories=categories)


def main(argv: list[str] | None = None) -> None:
    """Console script ``convforever-demo-data``."""
    parser = argparse.ArgumentParser(prog="convforever-demo-data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (train/ and eval/ are created in it)")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--eval-rows", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=64, help="shorter image side in pixels")
    parser.add_argument("--num-shards", type=int, default=4, help="number of train parquet files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        demo = write_demo_dataset(args.out, train_rows=args.train_rows, eval_rows=args.eval_rows,
                                  image_size=args.image_size, num_shards=args.num_shards, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"train: {args.train_rows} rows in {len(demo.train_files)} files under {Path(args.out) / 'train'}")
    print(f"eval:  {args.eval_rows} rows in {demo.eval_files[0]}")
    print(f"categories ({len(demo.categories)}): {', '.join(demo.categories)}")


if __name__ == "__main__":
    main()
