"""Images/s per CPU core of the full data path (shards -> labels -> decode -> augment -> normalised batches)
against a plain Pillow loop doing the same work on the same images, in the same run.

The data: demo shards (``write_demo_dataset``) drawn at ``--source-size`` px (shorter side; 80% JPEG, 20% PNG),
filtered to the rows the loader uses (a caption that names a category, bytes that decode), so both paths see
exactly the same images; cached in the temp directory. Both paths cycle over it endlessly.

  * plain: one process; pyarrow reads the ``image`` bytes from the same parquet files, then per image
    ``Image.open(BytesIO).convert("RGB")``, a random resized crop (``crop`` + bicubic ``resize``), a random
    horizontal flip, a float tensor normalised with the ImageNet mean/std; ``torch.stack`` per batch;
  * ours: ``make_loader(DataConfig(..., train=True))`` with ``num_workers`` 0 (everything in this process: one
    core, the fair per-core comparison), 1 and 2.

Each row: warm-up, then ``repeats`` measurements of the same number of images (whole passes over the data,
sized so the fastest path takes at least ``--seconds``), median reported. CPU time is read from /proc for this
process and its live children (DataLoader workers), so "per core" is images per CPU-second actually spent.
torch runs single-threaded in this process (workers are single-threaded already), so num_workers=0 is one core.
A cProfile pass over num_workers=0 and the plain loop (alternating chunks) then splits the time per image
into stages, and the appended section says which stages differ.

    python bench/data_throughput.py [--quick] [--no-append] [--sizes 224 64] [--source-size 320]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import math
import os
import platform
import pstats
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from convforever.data.demo import ROW_GROUP_ROWS, write_demo_dataset
from convforever.data.images import (
    CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UnusableImage,
    decode_image,
    decode_min_side,
)
from convforever.data.labels import classify_caption
from convforever.data.loader import DataConfig, make_loader
from results import append_results  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).with_name("RESULTS.md")
NUM_FILES = 2  # one shard per file, so num_workers=2 gives each worker one
MIN_CROP_SCALE = DataConfig.min_crop_scale  # the loader's default, used by both paths
_CLK_TCK = os.sysconf("SC_CLK_TCK")
PREFETCH_FACTOR = 2  # torch DataLoader's default, which make_loader keeps


# ----------------------------------------------------------------------------------------------- the data


def prepare_dataset(rows: int, source_size: int, repeat: int, seed: int) -> tuple[list[str], int, Counter]:
    """Parquet files holding only usable rows, each distinct image ``repeat`` times; (files, rows, mime counts).

    Cached under the temp directory by its parameters; the demo generator is slow at a few hundred pixels.
    """
    cache = Path(tempfile.gettempdir()) / f"convforever-bench-data-{source_size}px-{rows}rows-x{repeat}-seed{seed}"
    manifest = cache / "manifest.json"
    if manifest.exists():
        info = json.loads(manifest.read_text())
        return info["files"], info["rows"], Counter(info["mime"])
    started = time.monotonic()
    demo = write_demo_dataset(cache / "raw", train_rows=rows, eval_rows=1, image_size=source_size,
                              num_shards=NUM_FILES, seed=seed)
    files, kept, mime = [], 0, Counter()
    for i, path in enumerate(demo.train_files):
        table = pq.read_table(path)
        captions = table.column("caption").to_pylist()
        images = table.column("image").combine_chunks().field("bytes").to_pylist()
        usable = [classify_caption(c) is not None and _decodes(b) for c, b in zip(captions, images)]
        table = table.filter(pa.array(usable))
        mime.update(table.column("mime_type").to_pylist() * repeat)
        table = pa.concat_tables([table] * repeat)
        out = cache / "clean" / f"part-{i:05d}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out, row_group_size=ROW_GROUP_ROWS)
        files.append(str(out))
        kept += table.num_rows
    manifest.write_text(json.dumps({"files": files, "rows": kept, "mime": mime}))
    print(f"wrote {kept} usable rows ({rows} generated, x{repeat}) at {source_size} px to {cache} "
          f"in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return files, kept, mime


def _decodes(data: bytes | None) -> bool:
    try:
        decode_image(data, max_pixels=DataConfig.max_image_pixels)
        Image.open(io.BytesIO(data)).convert("RGB")
    except (UnusableImage, OSError, ValueError, SyntaxError):
        return False
    return True


# --------------------------------------------------------------------------------------- the plain loop


def plain_rows(files: list[str]) -> Iterator[bytes]:
    """Image bytes from the parquet files with pyarrow, file after file, endlessly."""
    while True:
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=["image"]):
                yield from batch.column(0).field("bytes").to_pylist()


def plain_decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def plain_augment(image: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Random resized crop (area in [MIN_CROP_SCALE, 1], log-uniform aspect in CROP_RATIO) + random flip."""
    width, height = image.size
    box = (0, 0, width, height)
    for _ in range(10):
        area = width * height * rng.uniform(MIN_CROP_SCALE, 1.0)
        aspect = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            box = (left, top, left + w, top + h)
            break
    image = image.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def plain_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, S, S) float32, normalised (what torchvision's ToTensor + Normalize do)."""
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).div_(255.0)
    return tensor.sub_(_MEAN).div_(_STD)


def plain_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors)


def plain_batches(files: list[str], size: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    rng = random.Random(seed)
    tensors: list[torch.Tensor] = []
    for data in plain_rows(files):
        tensors.append(plain_to_tensor(plain_augment(plain_decode(data), size, rng)))
        if len(tensors) == batch_size:
            yield plain_stack(tensors)
            tensors = []


# ------------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Pipeline:
    name: str
    workers: int | None  # None: the plain loop

    def batches(self, files: list[str], size: int, batch_size: int) -> Iterator[torch.Tensor]:
        if self.workers is None:
            return plain_batches(files, size, batch_size, seed=0)
        return _our_images(make_loader(DataConfig(files=files, image_size=size, batch_size=batch_size,
                                                  num_workers=self.workers, train=True, seed=0)))


PLAIN = Pipeline("plain Pillow loop", None)
OURS = [Pipeline(f"ours, num_workers={w}", w) for w in (0, 1, 2)]


def _our_images(loader) -> Iterator[torch.Tensor]:
    for batch in loader:
        if batch.skipped:  # the data holds only usable rows: a skip means the two paths saw different images
            raise RuntimeError(f"the loader skipped rows {batch.skipped}; the comparison needs identical images")
        yield batch.images


def _cpu_ticks(pid: int | str) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader workers), in seconds."""
    me, total = os.getpid(), _cpu_ticks("self")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == me:
                total += _cpu_ticks(entry)
        except (OSError, ValueError, IndexError):
            pass  # it exited meanwhile
    return total / _CLK_TCK


@dataclass
class Run:
    images: int
    wall: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.images / self.wall

    @property
    def per_cpu_second(self) -> float:
        return self.images / self.cpu

    @property
    def cores(self) -> float:
        return self.cpu / self.wall


def _take(batches: Iterator[torch.Tensor], count: int, size: int) -> int:
    taken = 0
    while taken < count:
        images = next(batches)
        if images.dtype != torch.float32 or tuple(images.shape[1:]) != (3, size, size):
            raise RuntimeError(f"unexpected batch {images.dtype} {tuple(images.shape)}")
        taken += images.shape[0]
    return taken


def measure_interleaved(paths: list[Pipeline], files: list[str], size: int, batch_size: int, rows: int,
                        seconds: float, repeats: int) -> dict[str, list[Run]]:
    """Each path's runs. All paths' iterators stay open and the measurements take turns (the order rotating
    every repeat), so load from other processes on the machine falls on every path alike.

    Warm-up: one pass over the data per path after its first batch (worker start-up, first shard); the fastest
    warm-up sizes the measurement: whole passes, the same count for every path, at least ``seconds`` long.
    Before each measurement of a path with workers, a few batches are taken untimed so the batches its workers
    prefetched while other paths ran are not counted.
    """
    iterators = {path.name: path.batches(files, size, batch_size) for path in paths}
    warm_rates = {}
    for path in paths:
        _take(iterators[path.name], batch_size, size)
        started = time.perf_counter()
        taken = _take(iterators[path.name], rows, size)
        warm_rates[path.name] = taken / (time.perf_counter() - started)
    count = max(1, math.ceil(seconds * max(warm_rates.values()) / rows)) * rows
    runs: dict[str, list[Run]] = {path.name: [] for path in paths}
    for repeat in range(repeats):
        for path in paths[repeat % len(paths):] + paths[:repeat % len(paths)]:
            batches = iterators[path.name]
            if path.workers:
                _take(batches, (2 * path.workers * PREFETCH_FACTOR + 2) * batch_size, size)
            wall, cpu = time.perf_counter(), cpu_seconds()
            taken = _take(batches, count, size)
            runs[path.name].append(Run(taken, time.perf_counter() - wall, cpu_seconds() - cpu))
            print(f"{size} px, {path.name}: {runs[path.name][-1].rate:.1f} images/s", file=sys.stderr)
    for batches in iterators.values():
        batches.close()  # shuts DataLoader workers down
    return runs


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


# ------------------------------------------------------------------------------------------- profiling

# Stage -> functions whose cumulative time it is, as (file name suffix, function name); minus the stages
# listed after it that run inside it.
OUR_STAGES: list[tuple[str, list[tuple[str, str]], list[str]]] = [
    ("read rows", [("data/shards.py", "_iter_parquet")],
     []),
    ("  of which opening shards (load_dataset, footer)",
     [("datasets/load.py", "load_dataset"), ("data/shards.py", "parquet_layout")], []),
    ("label captions", [("data/loader.py", "_label")], []),
    ("decode", [("data/images.py", "decode_image")], []),
    ("  of which exif_transpose (a full copy when no EXIF)", [("PIL/ImageOps.py", "exif_transpose")], []),
    ("crop + resize + flip", [("data/images.py", "train_transform")], ["to tensor"]),
    ("to tensor", [("data/images.py", "to_uint8_tensor")], []),
    ("normalise", [("data/images.py", "normalize")], []),
    ("stack batch", [("data/loader.py", "_batch")], []),
]
PLAIN_STAGES: list[tuple[str, list[tuple[str, str]], list[str]]] = [
    ("read rows", [("bench/data_throughput.py", "plain_rows")], []),
    ("decode", [("bench/data_throughput.py", "plain_decode")], []),
    ("crop + resize + flip", [("bench/data_throughput.py", "plain_augment")], []),
    ("to tensor", [("bench/data_throughput.py", "plain_to_tensor")], []),
    ("stack batch", [("bench/data_throughput.py", "plain_stack")], []),
]


def profile_pair(files: list[str], size: int, batch_size: int, count: int, chunks: int = 4
                 ) -> dict[str, tuple[dict[str, float], float]]:
    """Path name -> (stage -> ms per image, total ms per image) under cProfile, for ours (num_workers=0, so
    everything runs in this process) and the plain loop, ``count`` images each, taken in alternating chunks so
    other processes' load falls on both alike."""
    paths = [OURS[0], PLAIN]
    iterators = {path.name: path.batches(files, size, batch_size) for path in paths}
    profilers = {path.name: cProfile.Profile() for path in paths}
    seconds = {path.name: 0.0 for path in paths}
    taken = {path.name: 0 for path in paths}
    for path in paths:
        _take(iterators[path.name], batch_size, size)  # start-up is not profiled
    for _ in range(chunks):
        for path in paths:
            started = time.perf_counter()
            profilers[path.name].enable()
            taken[path.name] += _take(iterators[path.name], math.ceil(count / chunks), size)
            profilers[path.name].disable()
            seconds[path.name] += time.perf_counter() - started
    out = {}
    for path in paths:
        iterators[path.name].close()
        stats = pstats.Stats(profilers[path.name]).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
        stages = PLAIN_STAGES if path.workers is None else OUR_STAGES
        n = taken[path.name]
        cumulative = {stage: 1000 * sum(value[3] for (file, _, name), value in stats.items()
                                        for suffix, wanted in functions if name == wanted and file.endswith(suffix)) / n
                      for stage, functions, _ in stages}
        result = {stage: cumulative[stage] - sum(cumulative[m] for m in minus) for stage, _, minus in stages}
        top = [stage for stage, _, _ in stages if not stage.startswith("  ")]
        result["other"] = 1000 * seconds[path.name] / n - sum(result[stage] for stage in top)
        out[path.name] = (result, 1000 * seconds[path.name] / n)
    return out


# ------------------------------------------------------------------------------------------- reporting


def machine_facts() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from PIL import features

    turbo = "libjpeg-turbo" if features.check_feature("libjpeg_turbo") else "libjpeg"
    return (f"{model}, {os.cpu_count()} cores ({platform.machine()}); Python {platform.python_version()}, "
            f"torch {torch.__version__}, Pillow {PIL.__version__} ({turbo} {features.version('jpg')}), "
            f"pyarrow {pa.__version__}, datasets {_version('datasets')}")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run: 1 s per measurement, small data")
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64], help="training image sizes")
    parser.add_argument("--source-size", type=int, default=320, help="shorter side of the source images")
    parser.add_argument("--rows", type=int, default=600, help="distinct images to generate (before filtering)")
    parser.add_argument("--repeat", type=int, default=4, help="copies of each image in the files (bigger shards)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeat, args.seconds = min(args.rows, 100), 1, 1.0
    torch.set_num_threads(1)
    started = time.monotonic()

    files, rows, mime = prepare_dataset(args.rows, args.source_size, args.repeat, seed=0)
    report_rows: list[str] = []
    ratios: list[str] = []
    profiles: dict[int, tuple[dict[str, float], float, dict[str, float], float]] = {}
    load_before = os.getloadavg()
    for size in args.sizes:
        paths = [PLAIN, *OURS]
        runs = measure_interleaved(paths, files, size, args.batch_size, rows, args.seconds, args.repeats)
        measured = {name: (median_run(r), r) for name, r in runs.items()}
        plain = measured[PLAIN.name][0]
        for path in paths:
            run, all_runs = measured[path.name]
            spread = f"{min(r.rate for r in all_runs):.1f}-{max(r.rate for r in all_runs):.1f}"
            report_rows.append(
                f"| {size} | {path.name} | {run.images} | {run.wall:.2f} | {run.rate:.1f} | {spread} | "
                f"{run.cores:.2f} | {run.per_cpu_second:.1f} | {run.rate / plain.rate:.2f} | "
                f"{run.per_cpu_second / plain.per_cpu_second:.2f} |")
        ours0 = measured[OURS[0].name][0]
        ratios.append(f"{size} px, ours (num_workers=0) / plain, one process each: "
                      f"**{ours0.per_cpu_second / plain.per_cpu_second:.2f}x** images per CPU-second "
                      f"({ours0.per_cpu_second:.1f} vs {plain.per_cpu_second:.1f}); "
                      f"{ours0.rate / plain.rate:.2f}x images/s ({ours0.rate:.1f} vs {plain.rate:.1f})")
        count = measured[PLAIN.name][0].images
        profile_count = max(args.batch_size, min(rows, count))
        profiled = profile_pair(files, size, args.batch_size, profile_count)
        (ours_profile, ours_total), (plain_profile, plain_total) = profiled[OURS[0].name], profiled[PLAIN.name]
        profiles[size] = (ours_profile, ours_total, plain_profile, plain_total)

    elapsed = time.monotonic() - started
    command = " ".join(["python", "bench/data_throughput.py", *sys.argv[1:]])
    mime_text = ", ".join(f"{n} {m}" for m, n in sorted(mime.items()))
    report = [
        f"## {datetime.date.today().isoformat()} — data path throughput vs a plain Pillow loop"
        + (" (--quick)" if args.quick else ""),
        "",
        f"- command: `{command}`",
        (f"- machine: {machine_facts()}; torch set to 1 thread in the main process; load average (1 min) "
        f"{load_before[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (other processes share the cores: "
        f"images per CPU-second is the steadier figure)"),
        (f"- data: {rows} usable rows in {len(files)} parquet files (one shard each), {args.rows} demo images drawn at "
        f"{args.source_size} px shorter side (up to 1.5:1), each stored x{args.repeat}: {mime_text}; rows with no "
        f"caption category or an undecodable image removed, so both paths decode exactly the same images"),
        (f"- batch {args.batch_size}, random resized crop scale [{MIN_CROP_SCALE}, 1] with flip; each row: warm-up "
        f"pass, then {args.repeats} measurements of the same whole passes over the data (median shown, range of "
        f"the {args.repeats} beside it); CPU time from /proc for this process and its DataLoader workers; "
        f"run took {elapsed:.0f} s"),
        (f"- the machine has {os.cpu_count()} cores: with num_workers={os.cpu_count()} the workers compete with the "
        f"main process (which normalises batches and runs the training step in real use), so that row is the "
        f"ceiling of the whole machine, not of one core"),
        "",
        ("| train px | path | images | seconds | images/s | range | CPU cores busy | images per CPU-s "
        "| x plain images/s | x plain per CPU-s |"),
        "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|",
        *report_rows,
        "",
        *[f"- {r}" for r in ratios],
        "",
        ("Where the time goes: ms per image under cProfile over one pass each, num_workers=0 vs the plain loop, "
         "taken in alternating chunks (profiler overhead inflates Python-heavy stages such as labelling and "
         "reading; compare rows, not totals with the table above). read rows: ours `iter_shard` (datasets "
         "streaming, arrow to Python rows), plain pyarrow `iter_batches` of the image column; decode: ours "
         "`decode_image` (size guard, JPEG draft, load, exif_transpose, RGB), plain `Image.open().convert('RGB')`; "
         "to tensor: ours uint8, plain float and normalised; other: the remainder (DataLoader, shuffle buffer, "
         "generators, batching glue)."),
        "",
        "| stage | " + " | ".join(f"ours {s} px | plain {s} px" for s in args.sizes) + " |",
        "|---|" + "---:|---:|" * len(args.sizes),
    ]
    stages = list(dict.fromkeys([s for s, _, _ in OUR_STAGES] + ["other"]))
    for stage in stages:
        cells = []
        for size in args.sizes:
            ours_profile, _, plain_profile, _ = profiles[size]
            cells += [f"{ours_profile[stage]:.2f}",
                      f"{plain_profile[stage]:.2f}" if stage in plain_profile else "-"]
        report.append(f"| {stage} | " + " | ".join(cells) + " |")
    report.append("| total | " + " | ".join(f"{profiles[s][1]:.2f} | {profiles[s][3]:.2f}" for s in args.sizes)
                  + " |")
    report += ["", *interpretation(args.sizes, profiles, args.source_size, rows), ""]
    print("\n".join(report))
    if not args.no_append:
        append_results("\n".join(report))


def interpretation(sizes: list[int], profiles: dict, source_size: int, rows: int) -> list[str]:
    """One sentence per size, from the measured profile: where ours spends more and less than plain Pillow."""
    lines = []
    for size in sizes:
        ours, ours_total, plain, plain_total = profiles[size]
        deltas = {s: ours[s] - plain.get(s, 0.0) for s in ours if not s.startswith("  ")}
        more = sorted(((d, s) for s, d in deltas.items() if d > 0.005), reverse=True)
        less = sorted((d, s) for s, d in deltas.items() if d < -0.005)
        min_side = decode_min_side(size, True, MIN_CROP_SCALE)
        draft = (f"so {source_size} px JPEGs decode at half scale or less (draft mode)" if min_side * 2 <= source_size
                 else f"and draft mode only shrinks a JPEG whose shorter side stays at least that, so {source_size} "
                      "px sources decode at full size")
        lines.append(
            f"- {size} px: ours takes {ours_total:.2f} ms/image under the profiler vs {plain_total:.2f} for plain. "
            "More: " + (", ".join(f"{s} +{d:.2f}" for d, s in more) or "nothing") + "; less: "
            + (", ".join(f"{s} {d:.2f}" for d, s in less) or "nothing")
            + f" (ms/image). The decoder asks for a shorter side of {min_side} px, {draft}.")
    ours = profiles[sizes[0]][0]
    opening = ours["  of which opening shards (load_dataset, footer)"] * rows / NUM_FILES
    lines.append(
        f"- Inside ours ({sizes[0]} px profile): opening a shard (a fresh `datasets` streaming dataset, the footer "
        f"read again) takes about {opening:.0f} ms, paid once per {rows // NUM_FILES}-row shard here (local plans cut "
        f"20,000-row shards); `ImageOps.exif_transpose` takes "
        f"{ours['  of which exif_transpose (a full copy when no EXIF)']:.2f} ms/image, a full copy of the image when "
        "it has no EXIF orientation (plain's `convert('RGB')` of an RGB image copies likewise).")
    return lines


if __name__ == "__main__":
    main()
