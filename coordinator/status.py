"""The run's public record: its curves over time, the contributors' leaderboard, and the status document.

The coordinator's main loop calls, once per tick::

    history.record(view, metrics)
    board.update(build_status(run_id, view, metrics, history, checkpoint, data))

and the HTTP handlers (`web.py`) only read ``board``: serving a page never touches the DHT or the disk.

`RunHistory` keeps one point per tick that changed something and the per-peer contribution table, and
appends both to a JSONL file next to the checkpoints, so a restarted coordinator keeps its curves and its
leaderboard. Lines of that file are either a point ``{"time": ..., "global_step": ..., ...}`` or a peer
``{"peer": {...}}``; a later peer line replaces an earlier one. The file is rewritten (compacted) when it
holds much more than what is kept in memory, so it stays bounded however long the run lasts.

`prometheus_text` omits a sample whose value is unknown (no loss reported yet, no averaging round yet)
instead of exporting NaN: a scraper then sees a gap, not a NaN that poisons sums, rates and alert
comparisons. A family without any known sample is left out entirely, HELP and TYPE included.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from .protocol import METRICS_TTL, PeerMetrics, SwarmView, bytes_per_round, mean_loss

logger = logging.getLogger(__name__)

MAX_PEER_ID = 128  # libp2p ids are ~52 characters; a longer one is not a real peer and must not bloat the table
MAX_ROWS = 200  # leaderboard rows in /api/status (online peers are always listed besides these)
PEER_SAVE_EVERY = 60.0  # seconds between persisted updates of one peer's row (restarts are saved at once)


def finite(value: float | None) -> float | None:
    """JSON has no NaN: an unknown number is null."""
    return value if value is not None and math.isfinite(value) else None


def _short(value: float) -> float:
    """Six significant digits: the curves lose nothing visible and the JSON gets much smaller."""
    return float(f"{value:.6g}") if math.isfinite(value) else value


# ------------------------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class HistoryPoint:
    """The swarm at one tick; nan where nothing is known yet (no loss reported, no averaging round)."""

    time: float
    global_step: int
    loss: float  # throughput-weighted mean of the peers' recent losses
    samples_per_second: float  # the swarm's, from hivemind's progress records
    peers_online: int
    bytes_per_round: float  # mean over peers of gradient bytes sent per averaging round
    compression_ratio: float  # the smallest of the peers' ratios vs fp32 (the honest headline)

    def same_values(self, other: HistoryPoint) -> bool:
        """Equal apart from the time (nan equals nan): such a tick adds nothing to the curves."""
        for f in fields(self):
            if f.name == "time":
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
                return False
        return True

    def to_json(self) -> dict:
        return dict(self.row)

    @cached_property
    def row(self) -> dict:
        """The JSON form, computed once: the status document lists every point on every tick."""
        return {"time": round(self.time, 3), "global_step": self.global_step, "loss": finite(_short(self.loss)),
                "samples_per_second": finite(_short(self.samples_per_second)), "peers_online": self.peers_online,
                "bytes_per_round": finite(_short(self.bytes_per_round)),
                "compression_ratio": finite(_short(self.compression_ratio))}

    @classmethod
    def from_json(cls, obj: dict) -> HistoryPoint:
        def number(name: str) -> float:
            value = obj.get(name)
            return math.nan if value is None else float(value)

        return cls(time=float(obj["time"]), global_step=int(obj["global_step"]), loss=number("loss"),
                   samples_per_second=number("samples_per_second"), peers_online=int(obj["peers_online"]),
                   bytes_per_round=number("bytes_per_round"), compression_ratio=number("compression_ratio"))



def swarm_point(view: SwarmView, metrics: list[PeerMetrics], now: float) -> HistoryPoint:
    ratios = [m.compression_ratio for m in metrics if m.compression_ratio > 0]
    return HistoryPoint(
        time=now, global_step=view.global_step, loss=mean_loss(metrics),
        samples_per_second=float(view.samples_per_second), peers_online=view.num_peers,
        bytes_per_round=bytes_per_round(metrics),
        compression_ratio=min(ratios) if ratios else math.nan,
    )


# -------------------------------------------------------------------------------------- leaderboard


@dataclass
class Contribution:
    """One peer's row of the leaderboard.

    A peer's counters (`PeerMetrics.samples`, ``bytes_sent``, ``averaging_rounds``) count from the start of
    its process. When one of them goes backwards the peer restarted: what its previous process had reached is
    banked, and the total is ``banked + what the current process reports``. So a coordinator that missed some
    reports (or was restarted from a slightly stale file) still counts right, as long as it sees the counters
    fall. A restarted peer whose new counters overtake the old ones between two of our reads is not noticed
    (its old process's last samples are lost); with reports every few seconds that needs a very fast restart.
    """

    peer_id: str
    first_seen: float
    last_seen: float  # the coordinator's clock when it last read a new record: peers' clocks may be off
    reported: float = -math.inf  # the record's own time, so a record read again (DHT TTL) is not counted twice
    banked_samples: int = 0
    banked_bytes: int = 0
    process_samples: int = 0
    process_bytes: int = 0
    process_rounds: int = 0
    restarts: int = 0
    samples_per_second: float = 0.0
    step: int = 0
    loss: float = math.nan
    final: bool = False

    @property
    def samples(self) -> int:
        return self.banked_samples + self.process_samples

    @property
    def bytes_sent(self) -> int:
        return self.banked_bytes + self.process_bytes

    def observe(self, m: PeerMetrics, now: float) -> bool:
        """Fold in a record; False when it is one we already counted. True also when the peer restarted."""
        if m.time <= self.reported:
            return False
        restarted = (m.samples < self.process_samples or m.bytes_sent < self.process_bytes
                     or m.averaging_rounds < self.process_rounds)
        if restarted:
            self.banked_samples += self.process_samples
            self.banked_bytes += self.process_bytes
            self.restarts += 1
        self.process_samples, self.process_bytes, self.process_rounds = m.samples, m.bytes_sent, m.averaging_rounds
        self.reported, self.last_seen = m.time, now
        self.samples_per_second, self.step, self.final = m.samples_per_second, m.step, m.final
        if math.isfinite(m.loss):
            self.loss = m.loss
        return True

    def online(self, now: float, offline_after: float) -> bool:
        return not self.final and now - self.last_seen <= offline_after

    def to_json(self) -> dict:
        row = asdict(self)
        row["loss"] = finite(self.loss)
        row["reported"] = finite(self.reported)
        return row

    @classmethod
    def from_json(cls, obj: dict) -> Contribution:
        known = {f.name for f in fields(cls)}
        row = {k: v for k, v in obj.items() if k in known}
        row["loss"] = math.nan if row.get("loss") is None else float(row["loss"])
        row["reported"] = -math.inf if row.get("reported") is None else float(row["reported"])
        return cls(**row)


# ------------------------------------------------------------------------------------------ history


class RunHistory:
    """The run's curves and leaderboard, in memory and appended to ``path`` (None: memory only, for tests).

    At most `max_points` points are kept: past that, every other point of the older half is dropped, so the
    recent past stays at full resolution, the distant past gets sparser, and the run's first point stays.
    Points are dropped, not averaged: averaging a point that already stands for many with a fresh one would
    drag old times and values towards recent ones, each time a little more.
    At most `max_peers` peers are kept: past that, the offline peers with the fewest samples are forgotten.
    """

    def __init__(self, path: Path | None, max_points: int = 5000, offline_after: float = METRICS_TTL,
                 max_peers: int = 10_000) -> None:
        if max_points < 4:
            raise ValueError(f"max_points={max_points}: keep at least 4 points")
        self.path = Path(path) if path is not None else None
        self.max_points, self.offline_after, self.max_peers = max_points, offline_after, max_peers
        self.points: list[HistoryPoint] = []
        self.peers: dict[str, Contribution] = {}
        self._saved: dict[str, float] = {}  # peer -> when its row was last appended to the file
        self._lines = 0  # lines in the file now
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._load()

    @property
    def last_step(self) -> int:
        """The global step the run had reached, so a restarted coordinator does not show step 0."""
        return max((p.global_step for p in self.points), default=0)

    def record(self, view: SwarmView, metrics: list[PeerMetrics], now: float | None = None) -> HistoryPoint | None:
        """Fold one tick in; returns the new point, or None when the swarm looked exactly as before."""
        now = time.time() if now is None else now
        lines: list[dict] = []
        for m in metrics:
            if len(m.peer_id) > MAX_PEER_ID:
                continue
            entry = self.peers.get(m.peer_id)
            if entry is None:
                entry = self.peers[m.peer_id] = Contribution(m.peer_id, first_seen=now, last_seen=now)
            restarts = entry.restarts
            if entry.observe(m, now) and (entry.restarts != restarts or now - self._saved.get(m.peer_id, -math.inf)
                                          >= PEER_SAVE_EVERY):
                self._saved[m.peer_id] = now
                lines.append({"peer": entry.to_json()})
        self._forget_peers(now)
        point = swarm_point(view, metrics, now)
        added = not self.points or not point.same_values(self.points[-1])
        if added:
            self.points.append(point)
            lines.append(point.to_json())
        if len(self.points) > self.max_points:
            self._downsample()
            self._rewrite()  # so the file holds the points memory holds, and a restart thins nothing differently
        else:
            self._append(lines)
        return point if added else None

    def flush_peers(self) -> None:
        """Persist every peer's latest row now (call at shutdown: rows are otherwise saved once a minute)."""
        self._append([{"peer": c.to_json()} for c in self.peers.values()])

    def point_dicts(self) -> list[dict]:
        """The curves as one JSON-safe dict per point (what the Hub model card's table and loss curve take)."""
        return [p.to_json() for p in self.points]

    def columns(self) -> dict[str, list]:
        """The curves as columns (one list per field, null where unknown): half the JSON of a list of points."""
        return {f.name: [p.row[f.name] for p in self.points] for f in fields(HistoryPoint)}

    def leaderboard(self, now: float, data: dict | None = None, max_rows: int = MAX_ROWS) -> list[dict]:
        """Rows sorted by samples contributed (then rows of data used), each with its rank; every online peer
        is listed, and besides them the top `max_rows`. ``data`` is the lease ledger's summary: its per-peer
        shards and rows are joined in, and peers that only appear there get a row too."""
        ledger = (data or {}).get("peers") or {}
        rows = []
        for peer_id in {**self.peers, **ledger}:
            entry = self.peers.get(peer_id)
            used = ledger.get(peer_id, {})
            rows.append({
                "peer_id": peer_id,
                "samples": entry.samples if entry else 0,
                "samples_per_second": finite(_short(entry.samples_per_second)) if entry else None,
                "step": entry.step if entry else None,
                "loss": finite(_short(entry.loss)) if entry else None,
                "bytes_sent": entry.bytes_sent if entry else 0,
                "restarts": entry.restarts if entry else 0,
                "first_seen": round(entry.first_seen, 3) if entry else None,
                "last_seen": round(entry.last_seen, 3) if entry else None,
                "online": entry.online(now, self.offline_after) if entry else False,
                "shards": used.get("shards", 0),
                "rows_used": used.get("rows_used", 0),
            })
        rows.sort(key=lambda r: (-r["samples"], -r["rows_used"], r["peer_id"]))
        for rank, row in enumerate(rows, start=1):
            row["rank"] = rank
        return [r for r in rows if r["rank"] <= max_rows or r["online"]]

    # --------------------------------------------------------------------------------------- internals

    def _forget_peers(self, now: float) -> None:
        if len(self.peers) <= self.max_peers:
            return
        offline = sorted((c for c in self.peers.values() if not c.online(now, self.offline_after)),
                         key=lambda c: (c.samples, c.last_seen))
        for entry in offline[:len(self.peers) - self.max_peers]:
            del self.peers[entry.peer_id]
            self._saved.pop(entry.peer_id, None)

    def _downsample(self) -> None:
        keep = self.max_points // 2
        old, recent = self.points[:-keep], self.points[-keep:]
        self.points = old[::2] + recent

    def _append(self, lines: list[dict]) -> None:
        if self.path is None or not lines:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(line, separators=(",", ":"), allow_nan=False) + "\n" for line in lines)
            self._lines += len(lines)
            if self._lines > 2 * (len(self.points) + len(self.peers)) + 100:
                self._compact()
        except OSError as e:  # a full disk must not stop the coordinator; the curves live on in memory
            logger.warning(f"could not write the run history to {self.path}: {e}")

    def _rewrite(self) -> None:
        if self.path is None:
            return
        try:
            self._compact()
        except OSError as e:
            logger.warning(f"could not rewrite the run history {self.path}: {e}")

    def _compact(self) -> None:
        """Rewrite the file as exactly what is kept, atomically: a crash leaves the old file or the new one."""
        assert self.path is not None
        tmp = self.path.with_name(self.path.name + ".tmp")
        lines = [{"peer": c.to_json()} for c in self.peers.values()] + [p.to_json() for p in self.points]
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(line, separators=(",", ":"), allow_nan=False) + "\n" for line in lines)
        os.replace(tmp, self.path)
        self._lines = len(lines)

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.is_file():
            return
        bad = total = 0
        with self.path.open("r", encoding="utf-8", errors="replace") as f:
            for line in f:
                total += 1
                try:
                    obj = json.loads(line)
                    if "peer" in obj:
                        entry = Contribution.from_json(obj["peer"])
                        self.peers[entry.peer_id] = entry
                    else:
                        self.points.append(HistoryPoint.from_json(obj))
                except (ValueError, KeyError, TypeError, AttributeError):
                    bad += 1  # a line cut short by a crash, or written by something else: skip it
        while len(self.points) > self.max_points:
            self._downsample()
        self._lines = total
        if bad:
            logger.warning(f"{self.path}: skipped {bad} unreadable lines of {total}")
        # A torn last line would swallow the next append; and a long-running file may hold many superseded rows.
        if bad or total > 1.5 * (len(self.points) + len(self.peers)) + 10:
            self._rewrite()


# ------------------------------------------------------------------------------------------- status


def build_status(run_id: str, view: SwarmView, metrics: list[PeerMetrics], history: RunHistory,
                 checkpoint: dict | None, data: dict | None, now: float | None = None,
                 initial_peers: list[str] | None = None) -> dict:
    """The ``/api/status`` document; JSON-safe (no NaN anywhere: unknown numbers are null).

    ``checkpoint``: {"step", "path", "url"} of the latest checkpoint (url relative to the coordinator's base
    URL, or absolute, or None when it is not downloadable here); None before the first one.
    ``data``: the lease ledger's summary, None when peers bring their own data.
    ``initial_peers``: the multiaddrs volunteers pass as --initial-peers, shown on the page's join line.
    """
    now = time.time() if now is None else now
    point = swarm_point(view, metrics, now)
    rows = history.leaderboard(now, data)
    return {
        "run_id": run_id,
        "time": round(now, 3),
        "global_step": view.global_step,
        "peers_online": view.num_peers,
        "clients": view.num_clients,
        "samples_per_second": finite(_short(point.samples_per_second)),
        "loss": finite(_short(point.loss)),
        "bytes_per_round": finite(_short(point.bytes_per_round)),
        "compression_ratio": finite(_short(point.compression_ratio)),
        "samples_total": sum(c.samples for c in history.peers.values()),
        "latest_checkpoint": None if checkpoint is None else {
            "step": int(checkpoint["step"]), "path": str(checkpoint.get("path") or ""), "url": checkpoint.get("url")},
        "data": _json_safe(data),
        "initial_peers": list(initial_peers or []),
        "history": history.columns(),
        "peers_total": len({**history.peers, **((data or {}).get("peers") or {})}),
        "peers": rows,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class StatusBoard:
    """The latest status document, written by the main loop and read by HTTP handlers in another thread.

    The JSON is encoded once per update (in the main loop), so a page load costs the event loop nothing but
    a copy, however many visitors poll it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict | None = None
        self._json: bytes | None = None

    def update(self, status: dict) -> None:
        encoded = json.dumps(status, separators=(",", ":"), allow_nan=False).encode()  # fails loudly on a NaN
        with self._lock:
            self._status, self._json = status, encoded

    def current(self) -> dict | None:
        """The latest document (None before the first tick); treat it as read-only."""
        with self._lock:
            return self._status

    def current_json(self) -> bytes | None:
        with self._lock:
            return self._json


# --------------------------------------------------------------------------------------- prometheus


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else repr(float(value))


@dataclass
class _Family:
    name: str
    kind: str  # gauge | counter
    help: str
    samples: list[tuple[dict[str, str], float | int]]


def prometheus_text(status: dict) -> str:
    """`status` (a `build_status` document) in the Prometheus text exposition format 0.0.4."""
    data = status.get("data") or {}
    checkpoint = status.get("latest_checkpoint") or {}
    families = [
        _Family("convforever_global_step", "gauge", "The swarm's global step (optimizer epoch).",
                [({}, status.get("global_step"))]),
        _Family("convforever_peers_online", "gauge", "Training peers with a live progress record.",
                [({}, status.get("peers_online"))]),
        _Family("convforever_clients_online", "gauge", "Client-mode peers with a live progress record.",
                [({}, status.get("clients"))]),
        _Family("convforever_loss", "gauge", "Throughput-weighted mean of the peers' recent training losses.",
                [({}, status.get("loss"))]),
        _Family("convforever_samples_per_second", "gauge", "The swarm's training throughput.",
                [({}, status.get("samples_per_second"))]),
        _Family("convforever_bytes_per_round", "gauge", "Mean gradient bytes a peer sends per averaging round.",
                [({}, status.get("bytes_per_round"))]),
        _Family("convforever_compression_ratio", "gauge", "Smallest per-peer ratio of fp32 bytes to bytes sent.",
                [({}, status.get("compression_ratio"))]),
        _Family("convforever_samples_total", "counter", "Samples trained on by all peers the coordinator has seen.",
                [({}, status.get("samples_total"))]),
        _Family("convforever_checkpoint_step", "gauge", "Global step of the latest saved checkpoint.",
                [({}, checkpoint.get("step"))]),
        _Family("convforever_data_passes_completed", "gauge", "Completed passes over the dataset.",
                [({}, data.get("passes_completed"))]),
        _Family("convforever_data_shards_done", "gauge", "Shards completed in the current pass.",
                [({}, data.get("shards_done_this_pass"))]),
        _Family("convforever_data_shards", "gauge", "Shards in the data plan.", [({}, data.get("shards"))]),
        _Family("convforever_data_active_leases", "gauge", "Shard leases currently held by peers.",
                [({}, data.get("active_leases"))]),
        _Family("convforever_data_rows_used_total", "counter", "Dataset rows trained on, from completed shards.",
                [({}, data.get("rows_used"))]),
        _Family("convforever_skipped_rows_total", "counter", "Dataset rows skipped in completed shards, by reason.",
                [({"reason": str(k)}, v) for k, v in sorted((data.get("skipped") or {}).items())]),
        _Family("convforever_peer_samples_total", "counter", "Samples a peer has trained on (across its restarts).",
                [({"peer": r["peer_id"]}, r["samples"]) for r in status.get("peers", [])]),
        _Family("convforever_peer_samples_per_second", "gauge", "An online peer's latest reported throughput.",
                [({"peer": r["peer_id"]}, r["samples_per_second"]) for r in status.get("peers", []) if r["online"]]),
    ]
    out: list[str] = []
    for family in families:
        known = [(labels, v) for labels, v in family.samples
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if not known:
            continue
        out.append(f"# HELP {family.name} {family.help}")
        out.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in known:
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            out.append(f"{family.name}{{{label_text}}} {_number(value)}" if labels else f"{family.name} {_number(value)}")
    return "\n".join(out) + "\n"
