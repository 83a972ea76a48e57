"""A real headless Chromium for tests of the coordinator's page: DOM dumps, screenshots, and the page check.

Usage::

    from browser import check_page

    counts = check_page("http://127.0.0.1:8000/", ["12D3KooW...", "12D3KooX..."], tmp_path / "page.png")
    assert counts["charts"]["loss"] >= 3

Chromium runs as a fresh process per call (``--headless --dump-dom`` / ``--screenshot``) with a throwaway
profile, so calls never share state and may run side by side. ``--virtual-time-budget`` lets the page's
timers and fetches run for that many (virtual) milliseconds before the DOM is taken; network loads
pause virtual time, so a slow server only makes the call slower, not the result emptier.

Without a browser every helper calls ``pytest.skip`` with how to install one: CI installs Debian's
``chromium`` with apt (``apt-get install -y --no-install-recommends chromium fonts-dejavu-core``).
Set ``CHROMIUM`` to a binary's path to use another one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHARTS = ("loss", "samples_per_second", "peers_online", "bytes_per_round", "compression_ratio")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--mute-audio", "--hide-scrollbars")


def find_browser() -> str | None:
    """The Chromium (or Chrome) binary: $CHROMIUM, else the first of `BROWSERS` on PATH; None if none."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def require_browser() -> str:
    browser = find_browser()
    if browser is None:
        pytest.skip("no headless Chromium: install Debian's with `apt-get install -y --no-install-recommends "
                    f"chromium` (or set CHROMIUM=/path/to/chrome); looked for {', '.join(BROWSERS)}")
    return browser


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    browser = require_browser()
    with tempfile.TemporaryDirectory(prefix="convforever-chromium-") as profile:
        command = [browser, *FLAGS, f"--user-data-dir={profile}", *args]
        try:
            done = subprocess.run(command, check=False, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"chromium did not finish within {timeout:.0f}s: {' '.join(command)}") from e
    if done.returncode != 0:
        raise AssertionError(f"chromium exited with {done.returncode}: {' '.join(command)}\n"
                             f"{done.stderr.decode(errors='replace')[-3000:]}")
    return done


def dump_dom(url: str, wait_ms: int = 4000, size: tuple[int, int] = (1280, 900), timeout: float = 90.0) -> str:
    """The page's DOM, serialized after `wait_ms` of virtual time (its scripts have run by then)."""
    done = _run([f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={wait_ms}", "--dump-dom", url], timeout)
    return done.stdout.decode("utf-8", errors="replace")


def screenshot(url: str, path: Path | str, size: tuple[int, int] = (1280, 900), wait_ms: int = 4000,
               timeout: float = 90.0) -> Path:
    """A PNG of the page's first `size` pixels (the viewport), after `wait_ms` of virtual time."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    _run([f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
         timeout)
    if not path.is_file() or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError(f"chromium wrote no PNG screenshot at {path}")
    return path


# ------------------------------------------------------------------------------------------ the page


@dataclass
class Chart:
    data_points: int  # what the chart says it drew (its svg's data-points)
    vertices: int  # points the line goes through (M/L commands of path.line)
    markers: int  # circle.pt elements (one per point, up to the page's MARKERS)


@dataclass
class PageDom:
    """What a test needs from the page's DOM; see the comment at the top of coordinator/static/index.html."""

    state: str = ""
    charts: dict[str, Chart] = field(default_factory=dict)
    peer_rows: list[str] = field(default_factory=list)  # data-peer-id of each leaderboard row, in order
    banner: str | None = None  # the banner's text while it is shown
    empty_shown: bool = False
    texts: dict[str, str] = field(default_factory=dict)  # text of elements with an id
    links: dict[str, str] = field(default_factory=dict)  # href of <a> elements with an id
    tags: dict[str, int] = field(default_factory=dict)  # how many of each element


class _PageParser(HTMLParser):
    VOID: ClassVar[set[str]] = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = PageDom()
        self.stack: list[tuple[str, dict]] = []
        self.chart: str | None = None
        self.chart_depth = 0
        self.text_ids: list[tuple[str, int, list[str]]] = []  # (id, depth, text parts) of open elements with an id

    def handle_starttag(self, tag: str, attrs_list: list) -> None:
        attrs = {k: (v or "") for k, v in attrs_list}
        page = self.page
        page.tags[tag] = page.tags.get(tag, 0) + 1
        if tag == "body":
            page.state = attrs.get("data-state", "")
        if tag == "svg" and "data-chart" in attrs:
            self.chart = attrs["data-chart"]
            self.chart_depth = len(self.stack)
            page.charts[self.chart] = Chart(int(attrs.get("data-points", "0")), 0, 0)
        elif self.chart is not None:
            classes = attrs.get("class", "").split()
            if tag == "path" and "line" in classes:
                page.charts[self.chart].vertices = len(re.findall(r"[ML]", attrs.get("d", "")))
            if tag == "circle" and "pt" in classes:
                page.charts[self.chart].markers += 1
        if tag == "tr" and "data-peer-id" in attrs:
            page.peer_rows.append(attrs["data-peer-id"])
        if attrs.get("id") == "banner" and "hidden" not in attrs:
            page.banner = ""
        if attrs.get("id") == "empty" and "hidden" not in attrs:
            page.empty_shown = True
        if tag == "a" and "id" in attrs:
            page.links[attrs["id"]] = attrs.get("href", "")
        if tag in self.VOID:
            return
        self.stack.append((tag, attrs))
        if "id" in attrs:
            self.text_ids.append((attrs["id"], len(self.stack), []))

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID or not self.stack:
            return
        while self.stack:  # tolerate a missing end tag: close up to the matching start
            open_tag, _ = self.stack.pop()
            depth = len(self.stack) + 1
            while self.text_ids and self.text_ids[-1][1] >= depth:
                element_id, _, parts = self.text_ids.pop()
                self.page.texts[element_id] = "".join(parts).strip()
                if element_id == "banner" and self.page.banner is not None:
                    self.page.banner = self.page.texts[element_id]
            if self.chart is not None and len(self.stack) <= self.chart_depth:
                self.chart = None
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, _, parts in self.text_ids:
            parts.append(data)


def parse_page(html: str) -> PageDom:
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    return parser.page


def check_page(base_url: str, expected_peers: list[str], screenshot_path: Path | str,
               charts: tuple[str, ...] = CHARTS, size: tuple[int, int] = (1280, 900), wait_ms: int = 4000) -> dict:
    """Load the coordinator's page in headless Chromium and assert it shows the run.

    Asserts: the page got a status (no error banner, state "ready"); every chart in `charts` drew at least one
    point, with its line through exactly that many points (and one marker per point when it draws markers);
    the leaderboard lists every peer in `expected_peers`. Saves a screenshot at `screenshot_path`.
    Returns {"charts": {name: points}, "peers": [row ids], "state", "screenshot": path} for further checks.
    """
    url = base_url if base_url.endswith("/") else base_url + "/"
    page = parse_page(dump_dom(url, wait_ms=wait_ms, size=size))
    for _ in range(2):  # a cold machine can take longer than the budget to answer: look again before failing
        if page.state not in ("loading", "starting"):
            break
        page = parse_page(dump_dom(url, wait_ms=wait_ms * 2, size=size))
    assert page.banner is None, f"the page shows an error banner: {page.banner!r}"
    assert page.state == "ready", f"the page is {page.state!r}, not 'ready'"
    counts = {}
    for name in charts:
        chart = page.charts.get(name)
        assert chart is not None, f"no chart {name!r} in the page (found {sorted(page.charts)})"
        assert chart.data_points > 0, f"chart {name!r} drew no data points"
        assert chart.vertices == chart.data_points, f"chart {name!r}: line through {chart.vertices} points, " \
                                                    f"says {chart.data_points}"
        assert chart.markers in (0, chart.data_points), f"chart {name!r}: {chart.markers} markers for " \
                                                        f"{chart.data_points} points"
        counts[name] = chart.data_points
    missing = [p for p in expected_peers if p not in page.peer_rows]
    assert not missing, f"the peers table lacks {missing}; it lists {page.peer_rows}"
    shot = screenshot(url, screenshot_path, size=size, wait_ms=wait_ms)
    return {"charts": counts, "peers": page.peer_rows, "state": page.state, "screenshot": shot}
