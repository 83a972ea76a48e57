"""Where every benchmark in bench/ records its figures: one appended section per run, newest last."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nAppended by the scripts in bench/; newest last.\n\n"


def append_results(text: str) -> None:
    """Append ``text`` (ending in a newline) to bench/RESULTS.md, creating the file with its header."""
    if not RESULTS.exists():
        RESULTS.write_text(HEADER, encoding="utf-8")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
