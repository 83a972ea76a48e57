"""The data plan and the lease ledger: which shard each peer reads, kept in SQLite next to the checkpoints.

Rules the ledger enforces (tests/test_leases.py checks each one):
  * a shard is completed at most once per pass over the dataset (a primary key on (shard, pass)), so no
    completed shard is handed out twice in the same pass;
  * a lease lives ``ttl`` seconds unless renewed; an expired lease goes back to the pool, and the next
    holder resumes at the rows its previous holder reported, since those were already trained on;
  * a lease that was handed on is dead: its old holder's renewals and completion are refused;
  * when every shard of the current pass is completed or held, the next pass opens, so peers never wait
    for a straggler's shard; passes are counted (data epochs, not hivemind's optimizer epochs);
  * every change is committed before the reply, and a restarted coordinator extends live leases by one
    ``ttl``: peers could not renew while it was down, and their work must not be lost to that.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from convforever.data.shards import DatasetPlan, Shard

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, spec TEXT NOT NULL,
                                   num_rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, shard_id INTEGER NOT NULL, pass INTEGER NOT NULL,
                                   peer TEXT NOT NULL, granted REAL NOT NULL, expires REAL NOT NULL,
                                   start_row INTEGER NOT NULL, rows_done INTEGER NOT NULL,
                                   state TEXT NOT NULL);  -- active | done | expired | released
CREATE INDEX IF NOT EXISTS leases_by_pass ON leases (pass, state);
CREATE TABLE IF NOT EXISTS completions (shard_id INTEGER NOT NULL, pass INTEGER NOT NULL, lease_id TEXT NOT NULL,
                                        peer TEXT NOT NULL, used INTEGER NOT NULL, skipped TEXT NOT NULL,
                                        time REAL NOT NULL, PRIMARY KEY (shard_id, pass));
"""


@dataclass
class Grant:
    """What a peer receives: the shard, where to read it, and from which row."""

    lease_id: str
    shard: dict
    root: str
    start_row: int
    data_pass: int
    ttl: float

    def to_dict(self) -> dict:
        return asdict(self)


class LeaseError(Exception):
    """A renewal or completion the ledger refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LeaseLedger:
    def __init__(self, path: Path, plan: Optional[DatasetPlan] = None, ttl: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl={ttl}: must be positive seconds")
        self.path, self.ttl, self.clock = Path(path), ttl, clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        with self.lock, self._transaction():
            self._load_or_store_plan(plan)
            extended = self.db.execute("UPDATE leases SET expires = MAX(expires, ?) WHERE state = 'active'",
                                       (self.clock() + ttl,)).rowcount
        self.root = self._meta("root")
        self.spec = self._meta("spec")
        self.shards = [Shard.from_dict(json.loads(spec)) for (spec,) in
                       self.db.execute("SELECT spec FROM shards ORDER BY id")]
        self._orders: dict[int, list[int]] = {}
        if extended:
            logger.info(f"lease ledger {self.path}: {extended} live leases carried over (extended by {ttl:.0f}s)")

    # -------------------------------------------------------------------------------------- plan storage

    def _transaction(self):
        ledger = self

        class _Tx:
            def __enter__(self):
                ledger.db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, *_):
                ledger.db.execute("COMMIT" if kind is None else "ROLLBACK")

        return _Tx()

    def _meta(self, key: str) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else ""

    def _load_or_store_plan(self, plan: Optional[DatasetPlan]) -> None:
        stored = self.db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
        if stored:
            spec = self._meta("spec")
            if plan is not None and plan.spec != spec:
                raise ValueError(f"{self.path} holds the plan of dataset {spec!r}, not {plan.spec!r}: use a new "
                                 "--checkpoint-dir for a new dataset, or pass the same --dataset to resume")
            return
        if plan is None:
            raise ValueError(f"{self.path} has no dataset plan yet; pass --dataset to create one")
        self.db.executemany("INSERT INTO meta VALUES (?, ?)",
                            [("spec", plan.spec), ("root", plan.root), ("created", str(self.clock()))])
        self.db.executemany("INSERT INTO shards (id, key, spec, num_rows) VALUES (?, ?, ?, ?)",
                            [(i, s.key, s.to_json(), s.num_rows) for i, s in enumerate(plan.shards)])
        logger.info(f"lease ledger {self.path}: new plan of {len(plan.shards)} shards, "
                    f"{plan.num_rows} rows from {plan.spec}")

    @staticmethod
    def exists(path: Path) -> bool:
        """Whether ``path`` already holds a plan (so the coordinator can resume without re-planning)."""
        if not Path(path).is_file():
            return False
        db = sqlite3.connect(str(path))
        try:
            return db.execute("SELECT COUNT(*) FROM shards").fetchone()[0] > 0
        except sqlite3.OperationalError:
            return False
        finally:
            db.close()

    # ------------------------------------------------------------------------------------------- leasing

    def _order(self, data_pass: int) -> list[int]:
        """Each pass visits the shards in its own seeded order, the same after a restart."""
        if data_pass not in self._orders:
            order = list(range(len(self.shards)))
            random.Random(f"pass:{data_pass}").shuffle(order)
            self._orders = {data_pass: order, **{p: o for p, o in self._orders.items() if p >= data_pass - 1}}
        return self._orders[data_pass]

    def current_pass(self) -> int:
        """The lowest pass with a shard not yet completed (= passes completed so far)."""
        n = len(self.shards)
        row = self.db.execute("SELECT pass FROM completions GROUP BY pass HAVING COUNT(*) < ? ORDER BY pass LIMIT 1",
                              (n,)).fetchone()
        if row is not None:
            return row[0]
        last = self.db.execute("SELECT MAX(pass) FROM completions").fetchone()[0]
        return 0 if last is None else last + 1

    def grant(self, peer: str) -> Optional[Grant]:
        """A lease on the next free shard of the current pass (or of the next one, once the current pass
        has nothing left to hand out); None when every shard of both is completed or held."""
        with self.lock, self._transaction():
            now = self.clock()
            first = self.current_pass()
            for data_pass in (first, first + 1):
                done = {s for (s,) in self.db.execute("SELECT shard_id FROM completions WHERE pass = ?", (data_pass,))}
                live = {s: (lid, exp, rows) for lid, s, exp, rows in self.db.execute(
                    "SELECT id, shard_id, expires, rows_done FROM leases WHERE pass = ? AND state = 'active'",
                    (data_pass,))}
                for shard_id in self._order(data_pass):
                    if shard_id in done:
                        continue
                    start_row = 0
                    if shard_id in live:
                        old_id, expires, rows_done = live[shard_id]
                        if expires > now:
                            continue
                        # The holder stopped renewing: take the shard back and resume where it got to.
                        self.db.execute("UPDATE leases SET state = 'expired' WHERE id = ?", (old_id,))
                        start_row = rows_done
                        logger.info(f"lease {old_id} on shard {shard_id} expired; re-leasing from row {start_row}")
                    else:
                        start_row = self._resume_row(shard_id, data_pass)
                    lease_id = secrets.token_hex(8)
                    self.db.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'active')",
                                    (lease_id, shard_id, data_pass, peer, now, now + self.ttl, start_row, start_row))
                    shard = self.shards[shard_id]
                    return Grant(lease_id, asdict(shard), self.root, start_row, data_pass, self.ttl)
            return None

    def _resume_row(self, shard_id: int, data_pass: int) -> int:
        """Rows a released (or expired) earlier lease of this shard in this pass had reached."""
        row = self.db.execute("SELECT MAX(rows_done) FROM leases WHERE shard_id = ? AND pass = ? "
                              "AND state IN ('released', 'expired')", (shard_id, data_pass)).fetchone()
        return row[0] or 0

    def _live_lease(self, lease_id: str, peer: str) -> tuple[int, int]:
        row = self.db.execute("SELECT shard_id, pass, peer, state FROM leases WHERE id = ?", (lease_id,)).fetchone()
        if row is None:
            raise LeaseError(404, f"no lease {lease_id!r}")
        shard_id, data_pass, holder, state = row
        if holder != peer:
            raise LeaseError(403, f"lease {lease_id} belongs to another peer")
        if state != "active":
            raise LeaseError(410, f"lease {lease_id} is {state}; ask for a new one")
        return shard_id, data_pass

    def renew(self, lease_id: str, peer: str, rows_done: int) -> float:
        """Extend a live lease (even one past its expiry that nobody took over) and record progress."""
        with self.lock, self._transaction():
            shard_id, _ = self._live_lease(lease_id, peer)
            rows = min(max(int(rows_done), 0), self.shards[shard_id].num_rows)
            self.db.execute("UPDATE leases SET expires = ?, rows_done = MAX(rows_done, ?) WHERE id = ?",
                            (self.clock() + self.ttl, rows, lease_id))
            return self.ttl

    def complete(self, lease_id: str, peer: str, used: int, skipped: dict[str, int]) -> None:
        with self.lock, self._transaction():
            shard_id, data_pass = self._live_lease(lease_id, peer)
            try:
                self.db.execute("INSERT INTO completions VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (shard_id, data_pass, lease_id, peer, int(used), json.dumps(skipped), self.clock()))
            except sqlite3.IntegrityError:
                raise LeaseError(409, f"shard {shard_id} was already completed in pass {data_pass}") from None
            self.db.execute("UPDATE leases SET state = 'done', rows_done = ? WHERE id = ?",
                            (self.shards[shard_id].num_rows, lease_id))

    def release(self, lease_id: str, peer: str, rows_done: int) -> None:
        """A leaving peer hands its shard back at once instead of letting it expire."""
        with self.lock, self._transaction():
            shard_id, _ = self._live_lease(lease_id, peer)
            rows = min(max(int(rows_done), 0), self.shards[shard_id].num_rows)
            self.db.execute("UPDATE leases SET state = 'released', rows_done = MAX(rows_done, ?) WHERE id = ?",
                            (rows, lease_id))

    # ------------------------------------------------------------------------------------------- reading

    def summary(self) -> dict:
        """Progress of the data plan, for the status line and ``GET /api/v1/data``."""
        with self.lock:
            now = self.clock()
            data_pass = self.current_pass()
            done = self.db.execute("SELECT COUNT(*) FROM completions WHERE pass = ?", (data_pass,)).fetchone()[0]
            active = self.db.execute("SELECT COUNT(*) FROM leases WHERE state = 'active' AND expires > ?",
                                     (now,)).fetchone()[0]
            used, skipped = 0, {}
            peers: dict[str, dict] = {}
            for peer, n, rows, skips in self._completions_by_peer():
                used += rows
                peers[peer] = {"shards": n, "rows_used": rows}
                for reason, count in skips.items():
                    skipped[reason] = skipped.get(reason, 0) + count
            return {"dataset": self.spec, "root": self.root, "shards": len(self.shards),
                    "rows": sum(s.num_rows for s in self.shards), "passes_completed": data_pass,
                    "shards_done_this_pass": done, "active_leases": active, "rows_used": used,
                    "skipped": skipped, "peers": peers}

    def _completions_by_peer(self):
        per_peer: dict[str, list] = {}
        for peer, used, skipped in self.db.execute("SELECT peer, used, skipped FROM completions"):
            entry = per_peer.setdefault(peer, [0, 0, {}])
            entry[0] += 1
            entry[1] += used
            for reason, count in json.loads(skipped).items():
                entry[2][reason] = entry[2].get(reason, 0) + count
        return [(peer, n, rows, skips) for peer, (n, rows, skips) in per_peer.items()]

    def completions(self) -> list[tuple[int, int, str, int, dict]]:
        """(shard, pass, peer, used, skipped) of every completion, oldest first."""
        with self.lock:
            return [(s, p, peer, used, json.loads(skipped)) for s, p, peer, used, skipped in self.db.execute(
                "SELECT shard_id, pass, peer, used, skipped FROM completions ORDER BY time")]

    def close(self) -> None:
        with self.lock:
            self.db.close()
