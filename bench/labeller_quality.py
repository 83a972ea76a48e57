"""How well the caption classifier (convforever.data.labels) labels a hand-labelled sample of captions.

Each line of the sample is ``{"caption": "...", "label": "dog"}``, or ``"label": null`` where none of the 50
categories is the clear main subject. Prints, and appends to bench/RESULTS.md:

  * coverage: of the captions with a true category, the fraction that get any label at all;
  * precision: of all the labels emitted (null captions included), the fraction that are right;
  * recall: of the captions with a true category, the fraction labelled with that category;
  * false-label rate: of the null captions, the fraction that wrongly get a label;
  * per category: rows, labels emitted, right, missed (no label), wrong (another category), and labels
    wrongly given to the category; then every error, so keyword changes can be traced to rows.

With ``--baseline REV`` the data/labels.py of a git revision is measured on the same sample too, so a change
to the rules shows its before and after side by side.

    python bench/labeller_quality.py [--sample tests/data/captions_labelled.jsonl] [--baseline HEAD]
                                     [--no-append] [--note TEXT]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from convforever.data.labels import CATEGORIES, classify_caption
from results import append_results  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "captions_labelled.jsonl"
RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass(frozen=True)
class Row:
    caption: str
    truth: str | None
    predicted: str | None


@dataclass
class Quality:
    rows: list[Row]
    per_category: dict[str, Counter] = field(default_factory=dict)

    @property
    def positives(self) -> list[Row]:
        return [r for r in self.rows if r.truth is not None]

    @property
    def nulls(self) -> list[Row]:
        return [r for r in self.rows if r.truth is None]

    @property
    def emitted(self) -> list[Row]:
        return [r for r in self.rows if r.predicted is not None]

    @property
    def correct(self) -> int:
        return sum(r.truth is not None and r.predicted == r.truth for r in self.rows)

    @property
    def coverage(self) -> float:
        return _ratio(sum(r.predicted is not None for r in self.positives), len(self.positives))

    @property
    def precision(self) -> float:
        return _ratio(self.correct, len(self.emitted))

    @property
    def recall(self) -> float:
        return _ratio(self.correct, len(self.positives))

    @property
    def false_label_rate(self) -> float:
        return _ratio(sum(r.predicted is not None for r in self.nulls), len(self.nulls))

    @property
    def errors(self) -> list[Row]:
        return [r for r in self.rows if r.predicted != r.truth]


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def load_sample(path: Path = SAMPLE) -> list[tuple[str, str | None]]:
    """(caption, label or None) per non-blank line; refuses labels that are not category names."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        label = record["label"]
        if label is not None and label not in CATEGORIES:
            raise ValueError(f"{path}:{number}: label {label!r} is not one of the {len(CATEGORIES)} categories")
        rows.append((record["caption"], label))
    return rows


def baseline_classifier(revision: str) -> Callable[[str], int | None]:
    """``classify_caption`` of data/labels.py as of a git revision (that module needs only the standard library)."""
    source = subprocess.run(["git", "show", f"{revision}:data/labels.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    name = f"_labels_at_{len(sys.modules)}"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "labels.py")
        path.write_text(source, encoding="utf-8")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    if tuple(module.CATEGORIES) != CATEGORIES:
        raise ValueError(f"data/labels.py at {revision} has other categories; the sample's labels would not match")
    return module.classify_caption


def evaluate(sample: list[tuple[str, str | None]],
             classify: Callable[[str], int | None] = classify_caption) -> Quality:
    rows = []
    for caption, truth in sample:
        index = classify(caption)
        rows.append(Row(caption, truth, None if index is None else CATEGORIES[index]))
    quality = Quality(rows)
    for name in CATEGORIES:
        quality.per_category[name] = Counter()
    for row in rows:
        if row.truth is not None:
            counts = quality.per_category[row.truth]
            counts["rows"] += 1
            counts["right" if row.predicted == row.truth else "missed" if row.predicted is None else "wrong"] += 1
        if row.predicted is not None:
            quality.per_category[row.predicted]["emitted"] += 1
            if row.predicted != row.truth:
                quality.per_category[row.predicted]["false"] += 1
    return quality


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _metrics(quality: Quality) -> list[tuple[str, str]]:
    positives, nulls = quality.positives, quality.nulls
    covered = sum(r.predicted is not None for r in positives)
    false_nulls = sum(r.predicted is not None for r in nulls)
    return [
        ("coverage (captions with a category that get a label)",
         f"{_pct(quality.coverage)} ({covered}/{len(positives)})"),
        ("precision (emitted labels that are right)",
         f"{_pct(quality.precision)} ({quality.correct}/{len(quality.emitted)})"),
        ("recall (captions with a category labelled right)",
         f"{_pct(quality.recall)} ({quality.correct}/{len(positives)})"),
        ("false-label rate (null captions given a label)",
         f"{_pct(quality.false_label_rate)} ({false_nulls}/{len(nulls)})"),
    ]


def report(quality: Quality, *, sample_path: Path, note: str, baseline: tuple[str, Quality] | None = None
           ) -> list[str]:
    positives, nulls = quality.positives, quality.nulls
    try:
        shown = sample_path.resolve().relative_to(ROOT)
    except ValueError:
        shown = sample_path
    command = shlex.join(["python", "bench/labeller_quality.py", *sys.argv[1:]])
    header, rule, rows = "| metric | this tree |", "|---|---:|", _metrics(quality)
    if baseline is not None:
        header, rule = header + f" baseline ({baseline[0]}) |", rule + "---:|"
        rows = [(name, f"{value} | {old}") for (name, value), (_, old) in zip(rows, _metrics(baseline[1]))]
    lines = [
        f"## {datetime.date.today().isoformat()} — caption labeller quality{f', {note}' if note else ''}",
        "",
        f"- command: `{command}`",
        (f"- sample: `{shown}`, {len(quality.rows)} hand-labelled captions, {len(positives)} with a category "
         f"and {len(nulls)} with none"),
        "",
        header,
        rule,
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        ("Categories with any error (rows: sample rows of that category; missed: no label; wrong: another "
         "category; false: labels wrongly given to it):"),
        "",
        "| category | rows | emitted | right | missed | wrong | false |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in quality.per_category.items():
        if c["missed"] or c["wrong"] or c["false"]:
            lines.append(f"| {name} | {c['rows']} | {c['emitted']} | {c['right']} | {c['missed']} | {c['wrong']} "
                         f"| {c['false']} |")
    lines += ["", f"Errors ({len(quality.errors)}), as true -> predicted:", ""]
    for row in sorted(quality.errors, key=lambda r: (r.truth or "~", r.predicted or "~")):
        caption = row.caption if len(row.caption) <= 110 else row.caption[:107] + "..."
        lines.append(f"- {row.truth or 'null'} -> {row.predicted or 'null'}: {caption.replace('|', '/')}")
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="hand-labelled jsonl (caption, label)")
    parser.add_argument("--baseline", metavar="REV", help="also measure data/labels.py at this git revision")
    parser.add_argument("--note", default="", help="a few words for the section title, e.g. 'before the rework'")
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    sample = load_sample(args.sample)
    quality = evaluate(sample)
    baseline = None
    if args.baseline is not None:
        commit = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.strip()
        name = args.baseline if commit.startswith(args.baseline) else f"{args.baseline}, {commit}"
        baseline = (name, evaluate(sample, baseline_classifier(args.baseline)))
    lines = report(quality, sample_path=args.sample, note=args.note, baseline=baseline)
    print("\n".join(lines))
    if not args.no_append:
        append_results("\n".join(lines))


if __name__ == "__main__":
    main()
