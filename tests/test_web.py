"""The run's public face: history and leaderboard, the status document, Prometheus text, the HTTP routes,
and the page itself in a real headless Chromium (skipped, saying how to install one, where there is none).

The screenshot of the page lands in pytest's tmp dir and in tests/artifacts/web_page.png.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from browser import CHARTS, check_page, dump_dom, parse_page
from hivemind.optim.progress_tracker import LocalTrainingProgress

from convforever.coordinator.http import HttpServer
from convforever.coordinator.protocol import PeerMetrics, SwarmView, swarm_view
from convforever.coordinator.status import (
    RunHistory,
    StatusBoard,
    build_status,
    prometheus_text,
)
from convforever.coordinator.web import PROMETHEUS_CONTENT_TYPE, WebApi

ARTIFACTS = Path(__file__).parent / "artifacts"
PEER_A = "QmXqTs5oPexFe1zDiBHMKJ9tDXLYxmgPSaPyxwF4YRRzJH"
PEER_B = "QmbVvpHwG5mKuSgVx2czF84gnTMHtAN1f4HdeYq6Rj3CZq"


def metrics(peer: str, t: float, samples: int, step: int = 1, loss: float = 2.0, rate: float = 10.0,
            bytes_sent: int = 0, rounds: int = 0, ratio: float = 0.0, final: bool = False, **kw) -> PeerMetrics:
    return PeerMetrics(peer_id=peer, step=step, loss=loss, samples_per_second=rate, samples=samples,
                       bytes_sent=bytes_sent, bytes_received=bytes_sent, averaging_rounds=rounds,
                       last_group_size=2 if rounds else 0, compression_ratio=ratio,
                       skipped=kw.pop("skipped", {}), final=final, time=t, **kw)


def view(step: int, peers: int, rate: float = 20.0) -> SwarmView:
    return SwarmView(global_step=step, num_peers=peers, num_clients=0, samples_accumulated=0, samples_per_second=rate)


def simulate_run(history: RunHistory, ticks: int = 20, t0: float | None = None, every: float = 15.0):
    """Two peers training together, the way the coordinator's tick sees them: hivemind progress records folded by
    `swarm_view`, and each peer's `PeerMetrics` (A from the start, B from tick 3; B restarts at tick 12, so its
    counters fall back to zero). Returns (view, metrics, now) of the last tick and the samples each peer trained."""
    t0 = time.time() - ticks * every if t0 is None else t0
    trained = {PEER_A: 0, PEER_B: 0}
    b_process = 0
    for i in range(ticks):
        now = t0 + i * every
        step = i // 2
        a_samples = 64 * 6 * i
        trained[PEER_A] = a_samples
        records = [metrics(PEER_A, now, a_samples, step=step, loss=2.3 * math.exp(-0.04 * i) if i else math.nan,
                           rate=25.0 + i, bytes_sent=571_000 * step, rounds=step, ratio=57.4 if step else 0.0)]
        progress = [LocalTrainingProgress(peer_id=b"a", epoch=step, samples_accumulated=64 * (i % 2),
                                          samples_per_second=25.0 + i, time=now, client_mode=False)]
        if i >= 3:
            if i == 12:
                trained[PEER_B] += b_process
                b_process = 0
            b_process += 64 * 4
            b_rounds = max(0, step - 1) if i < 12 else max(0, step - 6)
            records.append(metrics(PEER_B, now, b_process, step=step, loss=2.4 * math.exp(-0.04 * i), rate=17.0,
                                   bytes_sent=520_000 * b_rounds, rounds=b_rounds, ratio=61.2 if b_rounds else 0.0,
                                   skipped={"no_label": i}))
            progress.append(LocalTrainingProgress(peer_id=b"b", epoch=step, samples_accumulated=64,
                                                  samples_per_second=17.0, time=now, client_mode=False))
        current = swarm_view({p.peer_id: p for p in progress}, now=now)
        history.record(current, records, now=now)
    trained[PEER_B] += b_process
    return current, records, now, trained


def ledger_summary() -> dict:
    """What `LeaseLedger.summary()` returns for a run with a dataset (see coordinator/leases.py)."""
    return {"dataset": "demo-data/*.parquet", "root": "demo-data", "shards": 12, "rows": 2400, "passes_completed": 0,
            "shards_done_this_pass": 5, "active_leases": 2, "rows_used": 980, "skipped": {"no_label": 20},
            "peers": {PEER_A: {"shards": 3, "rows_used": 590}, PEER_B: {"shards": 2, "rows_used": 390}}}


# ------------------------------------------------------------------------------------------- history


def test_history_persists_across_a_restart(tmp_path: Path):
    path = tmp_path / "ckpt" / "history.jsonl"
    history = RunHistory(path)
    last_view, _, _, trained = simulate_run(history, ticks=20)
    history.flush_peers()
    reopened = RunHistory(path)
    assert [p.to_json() for p in reopened.points] == [p.to_json() for p in history.points]
    assert len(reopened.points) == 20 and reopened.last_step == last_view.global_step == 9
    assert {k: c.samples for k, c in reopened.peers.items()} == trained
    assert reopened.peers[PEER_B].restarts == 1
    # a crash mid-line: the torn line is skipped, and the file is rewritten so the next append starts clean
    with path.open("a") as f:
        f.write('{"time": 12')
    torn = RunHistory(path)
    assert len(torn.points) == 20 and path.read_text().endswith("}\n")
    assert len(path.read_text().splitlines()) == 20 + 2


def test_an_unchanged_tick_adds_no_point(tmp_path: Path):
    history = RunHistory(tmp_path / "h.jsonl")
    assert history.record(view(3, 1), [metrics(PEER_A, 1.0, 10)], now=100.0) is not None
    assert history.record(view(3, 1), [metrics(PEER_A, 1.0, 10)], now=105.0) is None  # same record, same swarm
    assert history.record(view(3, 0), [], now=110.0) is not None  # the peer left: that is news
    assert history.record(view(3, 0), [], now=115.0) is None
    assert len(RunHistory(tmp_path / "h.jsonl").points) == 2


def test_downsampling_keeps_memory_and_file_bounded(tmp_path: Path):
    path = tmp_path / "h.jsonl"
    history = RunHistory(path, max_points=40)
    for i in range(2000):
        history.record(view(i, 2, rate=float(i)), [metrics(PEER_A, float(i), i, loss=1.0 + (i % 7))], now=1000.0 + i)
    assert 20 <= len(history.points) <= 40
    times = [p.time for p in history.points]
    assert times == sorted(times) and times[0] == 1000.0 and times[-1] == 1000.0 + 1999  # the run's first point stays
    assert [p.global_step for p in history.points[-20:]] == list(range(1980, 2000))  # recent past: full resolution
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] > gaps[-1] == 1.0  # the distant past is sparser
    assert all(p.samples_per_second == p.global_step for p in history.points)  # kept points are real ones
    lines = path.read_text().splitlines()
    assert len(lines) <= 2 * (40 + 1) + 100 + 1
    assert [p.to_json() for p in RunHistory(path, max_points=40).points] == [p.to_json() for p in history.points]
    # a file from a longer-lived coordinator (or a larger max_points) is thinned and compacted on load
    small = RunHistory(path, max_points=10)
    assert len(small.points) <= 10 and len(path.read_text().splitlines()) == len(small.points) + 1


def test_samples_add_up_across_peer_restarts_and_coordinator_restarts(tmp_path: Path):
    path = tmp_path / "h.jsonl"
    history = RunHistory(path, offline_after=60.0)
    for t, samples in [(1.0, 100), (2.0, 300), (2.0, 300), (3.0, 50), (4.0, 120)]:  # restart after t=2; t=2 read twice
        history.record(view(1, 1), [metrics(PEER_A, t, samples, bytes_sent=samples * 10)], now=100.0 + t)
    row = history.peers[PEER_A]
    assert (row.samples, row.bytes_sent, row.restarts) == (420, 4200, 1)
    history.flush_peers()
    # the coordinator restarts; it reads the same record again (still in the DHT), then the peer restarts too
    history = RunHistory(path, offline_after=60.0)
    history.record(view(1, 1), [metrics(PEER_A, 4.0, 120)], now=200.0)
    history.record(view(1, 1), [metrics(PEER_A, 5.0, 30)], now=201.0)
    assert (history.peers[PEER_A].samples, history.peers[PEER_A].restarts) == (450, 2)
    # the leaderboard: ledger rows joined in, a ledger-only peer listed, offline after the timeout or when final
    history.record(view(1, 2), [metrics(PEER_B, 6.0, 900, final=True)], now=202.0)
    data = {"peers": {PEER_A: {"shards": 2, "rows_used": 400}, "QmLedgerOnly": {"shards": 1, "rows_used": 50}}}
    rows = history.leaderboard(now=230.0, data=data)
    assert [(r["peer_id"], r["rank"], r["online"]) for r in rows] == [
        (PEER_B, 1, False), (PEER_A, 2, True), ("QmLedgerOnly", 3, False)]
    assert rows[1]["shards"] == 2 and rows[1]["rows_used"] == 400 and rows[2]["samples"] == 0
    assert not history.leaderboard(now=262.0)[1]["online"]  # 61 s without a new record
    # a peer id no libp2p peer could have is not a row
    history.record(view(1, 2), [metrics("x" * 500, 7.0, 10**9)], now=203.0)
    assert "x" * 500 not in history.peers


def test_leaderboard_is_bounded_but_lists_every_online_peer():
    history = RunHistory(None, max_peers=50)
    for i in range(60):
        history.record(view(1, 1), [metrics(f"Qm{i:03d}", 1.0, 1000 + i)], now=100.0)  # all offline by t=500
    history.record(view(1, 1), [metrics("QmSmallButOnline", 2.0, 1)], now=500.0)
    assert len(history.peers) == 50 and "Qm000" not in history.peers and "Qm059" in history.peers
    rows = history.leaderboard(now=500.0, max_rows=5)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5, 50] and rows[-1]["peer_id"] == "QmSmallButOnline"


# ------------------------------------------------------------------------------------------- status


def test_status_document_is_json_safe():
    history = RunHistory(None)
    nan_peer = [metrics(PEER_A, 1.0, 0, loss=math.nan)]  # no batch yet, no averaging round yet
    history.record(view(0, 1, rate=0.0), nan_peer, now=10.0)
    status = build_status("demo", view(0, 1, rate=0.0), nan_peer, history, None,
                          {"peers": {}, "odd": math.nan, "nested": [math.inf, 1.5]}, now=11.0)
    text = json.dumps(status, allow_nan=False)  # raises on NaN/Infinity
    back = json.loads(text)
    assert back["loss"] is None and back["bytes_per_round"] is None and back["compression_ratio"] is None
    assert back["latest_checkpoint"] is None and back["data"]["odd"] is None and back["data"]["nested"] == [None, 1.5]
    assert back["history"]["loss"] == [None] and back["peers"][0]["loss"] is None
    board = StatusBoard()
    assert board.current() is None and board.current_json() is None
    board.update(status)
    assert json.loads(board.current_json()) == back
    with pytest.raises(ValueError):
        board.update({"loss": math.nan})  # a document with NaN never reaches a visitor


def test_status_document_describes_the_run():
    history = RunHistory(None)
    last_view, last_metrics, now, trained = simulate_run(history)
    status = build_status("demo", last_view, last_metrics, history,
                          {"step": 8, "path": "/ckpt/step-8", "url": None}, ledger_summary(), now=now + 2,
                          initial_peers=["/ip4/10.0.0.1/tcp/31337/p2p/QmCoordinator"])
    assert status["global_step"] == 9 and status["peers_online"] == 2 and status["samples_per_second"] == 61.0
    assert status["bytes_per_round"] == pytest.approx((571_000 + 520_000) / 2)
    assert status["compression_ratio"] == 57.4  # the smallest: the claim every peer lives up to
    assert status["samples_total"] == sum(trained.values())
    assert [r["peer_id"] for r in status["peers"]] == [PEER_A, PEER_B]
    assert [r["samples"] for r in status["peers"]] == [trained[PEER_A], trained[PEER_B]]
    assert status["latest_checkpoint"] == {"step": 8, "path": "/ckpt/step-8", "url": None}
    assert history.point_dicts()[-1] == {k: v[-1] for k, v in status["history"].items()}  # for the Hub card
    assert len(status["history"]["time"]) == 20 and set(status["history"]) == {
        "time", "global_step", "loss", "samples_per_second", "peers_online", "bytes_per_round", "compression_ratio"}


# --------------------------------------------------------------------------------------- prometheus

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_prometheus(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """A strict reader of the text format: (TYPE of each family, samples); fails on anything out of place."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"two HELP lines for {name}"
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"two TYPE lines for {name}"
            assert kind in ("gauge", "counter"), line
            assert kind != "counter" or name.endswith("_total"), f"counter {name} should end in _total"
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, _, label_text, value = match.groups()
            assert name in types, f"{name} sampled before its TYPE"
            labels = {}
            if label_text:
                consumed = 0
                for label in LABEL.finditer(label_text):
                    assert label.start() == consumed, f"bad labels in {line!r}"
                    labels[label.group(1)] = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)),
                                                    label.group(2))
                    consumed = label.end()
                assert consumed == len(label_text), f"bad labels in {line!r}"
            samples.append((name, labels, float(value)))
    assert set(types) == helps
    return types, samples


def test_prometheus_text_parses_back_with_escaped_labels():
    history = RunHistory(None)
    last_view, last_metrics, now, trained = simulate_run(history)
    odd = 'Qm"quoted"\\back\nline'
    history.record(last_view, [*last_metrics, metrics(odd, now + 1, 5)], now=now + 1)
    data = ledger_summary()
    data["skipped"] = {"no_label": 20, 'bad "image"': 3}
    status = build_status("demo", last_view, last_metrics, history, {"step": 8, "path": "p", "url": None}, data,
                          now=now + 2)
    types, samples = parse_prometheus(prometheus_text(status))
    values = {(name, tuple(sorted(labels.items()))): v for name, labels, v in samples}
    assert types["convforever_global_step"] == "gauge" and values[("convforever_global_step", ())] == 9
    assert types["convforever_peer_samples_total"] == "counter"
    assert values[("convforever_peer_samples_total", (("peer", PEER_A),))] == trained[PEER_A]
    assert values[("convforever_peer_samples_total", (("peer", odd),))] == 5  # escaped and read back intact
    assert values[("convforever_skipped_rows_total", (("reason", 'bad "image"'),))] == 3
    assert values[("convforever_checkpoint_step", ())] == 8 and values[("convforever_data_shards_done", ())] == 5
    assert values[("convforever_data_rows_used_total", ())] == 980
    assert values[("convforever_compression_ratio", ())] == 57.4
    for name in ("convforever_peers_online", "convforever_loss", "convforever_samples_per_second",
                 "convforever_bytes_per_round", "convforever_data_passes_completed",
                 "convforever_peer_samples_per_second"):
        assert name in types
    assert all(math.isfinite(v) for _, _, v in samples)


def test_prometheus_leaves_out_what_is_unknown():
    history = RunHistory(None)
    status = build_status("demo", view(0, 0, rate=0.0), [], history, None, None, now=1.0)
    types, samples = parse_prometheus(prometheus_text(status))
    assert "convforever_loss" not in types and "convforever_compression_ratio" not in types
    assert "convforever_checkpoint_step" not in types and "convforever_data_shards_done" not in types
    assert ("convforever_global_step", {}, 0.0) in samples and ("convforever_peers_online", {}, 0.0) in samples


# ------------------------------------------------------------------------------------------- server


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def site(tmp_path: Path):
    """A live HTTP server with the page's routes over a board fed by two simulated peers; checkpoints served."""
    history = RunHistory(tmp_path / "ckpt" / "history.jsonl")
    last_view, last_metrics, now, trained = simulate_run(history)
    (tmp_path / "ckpt" / "step-8").mkdir()
    (tmp_path / "ckpt" / "step-8" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "ckpt" / "step-8" / "secret.key").write_bytes(b"key")
    board = StatusBoard()
    api = WebApi(board, checkpoint_dir=tmp_path / "ckpt")
    server = HttpServer(api.routes(), "127.0.0.1", 0)
    port = server.start()
    base = f"http://127.0.0.1:{port}"
    assert get(base + "/api/status")[0] == 503 and get(base + "/metrics")[0] == 503  # before the first tick
    checkpoint = {"step": 8, "path": str(tmp_path / "ckpt" / "step-8"),
                  "url": api.checkpoint_url(str(tmp_path / "ckpt" / "step-8"))}
    board.update(build_status("demo", last_view, last_metrics, history, checkpoint, ledger_summary(),
                              now=now + 2, initial_peers=["/ip4/127.0.0.1/tcp/31337/p2p/QmCoordinator"]))
    yield base, board, trained
    server.stop()


def test_status_and_metrics_over_http(site):
    base, board, trained = site
    status, headers, body = get(base + "/api/status")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    document = json.loads(body)
    assert document == board.current()
    assert [r["peer_id"] for r in document["peers"]] == [PEER_A, PEER_B]
    assert len(document["history"]["time"]) == 20
    assert document["latest_checkpoint"]["url"] == "checkpoints/step-8/model.safetensors"
    status, headers, body = get(base + "/metrics")
    assert status == 200 and headers["Content-Type"] == PROMETHEUS_CONTENT_TYPE
    _, samples = parse_prometheus(body.decode())
    assert ("convforever_peer_samples_total", {"peer": PEER_B}, float(trained[PEER_B])) in samples
    status, headers, body = get(base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'sha256-" in csp
    # self-contained: nothing in the page points at another host
    assert not re.search(rb'(src|href)\s*=\s*["\']?(https?:)?//', body) and b"@import" not in body


def test_checkpoint_files_are_served_and_nothing_else(site):
    base, _, _ = site
    status, headers, body = get(base + "/checkpoints/step-8/model.safetensors")
    assert status == 200 and body == b"weights" and "attachment" in headers.get("Content-Disposition", "")
    for path in ("/checkpoints/step-8/secret.key", "/checkpoints/step-9/model.safetensors",
                 "/checkpoints/step-8/..%2Fhistory.jsonl", "/checkpoints/..%2Fhistory.jsonl/model.safetensors",
                 "/checkpoints/step-8/config.json"):
        assert get(base + path)[0] == 404, path


# ------------------------------------------------------------------------------------------ browser


def test_page_in_headless_chromium(site, tmp_path: Path):
    base, board, _ = site
    counts = check_page(base + "/", [PEER_A, PEER_B], tmp_path / "web_page.png")
    history = board.current()["history"]
    steps_with_loss = {s for s, loss in zip(history["global_step"], history["loss"]) if loss is not None}
    assert counts["charts"] == {
        "loss": len(steps_with_loss),  # one point per global step
        "samples_per_second": 20,
        "peers_online": 20,
        "bytes_per_round": sum(v is not None for v in history["bytes_per_round"]),
        "compression_ratio": sum(v is not None for v in history["compression_ratio"]),
    }
    assert set(counts["charts"]) == set(CHARTS) and min(counts["charts"].values()) >= 9
    assert counts["peers"] == [PEER_A, PEER_B]  # ranked by samples contributed
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(counts["screenshot"], ARTIFACTS / "web_page.png")
    page = parse_page(dump_dom(base + "/"))
    assert page.texts["v-step"] == "9" and page.texts["v-peers"] == "2" and page.texts["v-ratio"] == "57.4×"
    assert page.texts["ckpt-step"] == "step-8"
    assert page.links["ckpt-a"] == base + "/checkpoints/step-8/model.safetensors"
    assert page.texts["v-data"] == "pass 1" and "5 / 12 shards" in page.texts["s-data"]
    assert not page.empty_shown


def _serve(board: StatusBoard, status_route=None) -> tuple[HttpServer, str]:
    api = WebApi(board)
    routes = api.routes() if status_route is None else [web.get("/", api.index), web.get("/api/status", status_route)]
    server = HttpServer(routes, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.start()}/"


def test_page_states_and_hostile_peer_ids_in_headless_chromium():
    board = StatusBoard()
    server, url = _serve(board)
    try:
        page = parse_page(dump_dom(url, wait_ms=2000))  # before the coordinator's first tick: 503
        assert page.state == "starting" and "starting" in (page.banner or "")

        history = RunHistory(None)
        board.update(build_status("fresh-run", view(0, 0, rate=0.0), [], history, None, None,
                                  initial_peers=["/ip4/1.2.3.4/tcp/31337/p2p/QmCoordinator"]))
        page = parse_page(dump_dom(url, wait_ms=2000))
        assert page.state == "empty" and page.empty_shown and page.banner is None
        assert "--run-id fresh-run --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/QmCoordinator" in page.texts["join"]
        assert all(chart.data_points == 0 for chart in page.charts.values()) and len(page.charts) == len(CHARTS)

        # Peer ids come from DHT records anyone can write: they must show up as text, never as markup.
        hostile = '<img src=x onerror="document.title=1">"\'&'
        history.record(view(1, 1), [metrics(hostile, time.time(), 64)])
        board.update(build_status("<b>run</b>", view(1, 1), [metrics(hostile, time.time(), 64)], history,
                                  {"step": 1, "path": "/p", "url": "javascript:alert(1)"}, None))
        page = parse_page(dump_dom(url, wait_ms=2000))
        assert page.state == "ready" and page.peer_rows == [hostile]
        assert page.tags.get("img", 0) == 0 and page.tags.get("b", 0) == 0 and page.texts["run-id"] == "<b>run</b>"
        assert "ckpt-a" not in page.links and page.texts["ckpt-link"] == "/p"  # no javascript: link
    finally:
        server.stop()

    async def failing(request: web.Request) -> web.Response:
        return web.json_response({"error": "boom"}, status=500)

    server, url = _serve(board, failing)
    try:
        page = parse_page(dump_dom(url, wait_ms=2000))
        assert page.state == "error" and "HTTP 500" in (page.banner or "")
    finally:
        server.stop()
