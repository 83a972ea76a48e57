"""The peer's side of the coordinator's shard leases: a `ShardSource` for the data loader.

Each DataLoader worker holds its own leases: it asks the coordinator for a shard, streams it, renews the
lease as it goes (reporting how far it got), and reports the shard done with its counts. The coordinator
being down must never stop training (the swarm's averaging does not need it): a worker whose coordinator
does not answer re-reads the shard it last finished and retries with exponential backoff, and completions
it could not deliver are kept and re-sent when the coordinator is back.

Plain `urllib`: a worker makes a request every few minutes, and the source must pickle into worker
processes, so a connection pool or an event loop would buy nothing here.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Optional

from convforever.data.loader import Lease
from convforever.data.shards import Shard

logger = logging.getLogger(__name__)


class CoordinatorGone(Exception):
    """No answer (connection refused, timeout, 5xx): retry later, keep training meanwhile."""


class LeaseRefused(Exception):
    """The coordinator answered no (lease lost, wrong peer, bad request): do not retry this call."""


def call(url: str, body: Optional[dict] = None, timeout: float = 10.0, auth=None) -> dict:
    """One JSON request; GET without a body, POST with one. ``auth``: a private run's `RequestSigner`."""
    data = None if body is None else json.dumps(body).encode()
    method = "GET" if body is None else "POST"
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        parts = urllib.parse.urlsplit(url)
        headers.update(auth.headers(method, parts.path + (f"?{parts.query}" if parts.query else ""), data or b""))
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        detail = e.read()[:500].decode(errors="replace")
        if e.code >= 500 or e.code == 429:
            raise CoordinatorGone(f"{url}: HTTP {e.code} {detail}") from None
        raise LeaseRefused(f"{url}: HTTP {e.code} {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise CoordinatorGone(f"{url}: {e}") from None


def reachable_url(urls: list[str], timeout: float = 5.0) -> Optional[str]:
    """The first of the announced API URLs that answers /healthz from here."""
    for url in urls:
        try:
            request = urllib.request.Request(url.rstrip("/") + "/healthz")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if response.status == 200:
                    return url.rstrip("/")
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return None


@dataclass
class CoordinatorShards:
    """Leases from the coordinator at ``url`` (a ShardSource; one copy per DataLoader worker process).

    ``data_root`` replaces the plan's root (the coordinator's path or ``hf://...``) for a peer that keeps
    its own copy of the dataset.
    """

    url: str
    peer_id: str
    data_root: Optional[str] = None
    timeout: float = 10.0
    backoff: float = 2.0  # seconds before the first retry, doubling up to max_backoff
    max_backoff: float = 60.0
    max_empty: int = 20  # shards in a row without a usable row before a worker gives up
    auth: Optional[Any] = None  # a private run's RequestSigner (peer/access.py): signs every call with our certificate
    _last: Optional[Lease] = field(default=None, repr=False)
    _undelivered: list[tuple[str, dict]] = field(default_factory=list, repr=False)
    _retry_at: float = field(default=0.0, repr=False)
    _delay: float = field(default=0.0, repr=False)

    def acquire(self, worker: int, num_workers: int) -> Optional[Lease]:
        while True:
            if time.monotonic() >= self._retry_at:
                try:
                    self._deliver()
                    answer = call(f"{self.url}/api/v1/leases", {"peer_id": self.peer_id}, self.timeout, self.auth)
                except CoordinatorGone as e:
                    self._failed(f"the coordinator at {self.url} does not answer ({e})")
                except LeaseRefused as e:
                    self._failed(f"the coordinator refused a lease ({e})")
                else:
                    grant = answer.get("lease")
                    if grant is not None:
                        self._delay = 0.0
                        self._last = Lease(shard=Shard.from_dict(grant["shard"]), root=self.data_root or grant["root"],
                                           lease_id=grant["lease_id"], start_row=int(grant["start_row"]),
                                           data_pass=int(grant["data_pass"]), renew_every=float(grant["ttl"]) / 3)
                        return self._last
                    self._retry_at = time.monotonic() + float(answer.get("retry_after", 10.0))
                    logger.info("worker %d: every shard is leased; asking again in %.0fs", worker,
                                self._retry_at - time.monotonic())
            if self._last is not None:
                # Keep the accelerator busy (and the swarm averaging) on data we already have.
                logger.info("worker %d: re-reading %s until a new lease comes", worker, self._last.shard.key)
                return Lease(self._last.shard, self._last.root, lease_id="", data_pass=self._last.data_pass)
            time.sleep(max(0.0, self._retry_at - time.monotonic()))

    def _failed(self, why: str) -> None:
        self._delay = min(self.max_backoff, self._delay * 2 or self.backoff)
        self._retry_at = time.monotonic() + self._delay
        logger.warning(f"{why}; retrying in {self._delay:.0f}s" +
                       ("" if self._last else " (no shard to train on until then)"))

    def renew(self, lease: Lease, rows_done: int) -> bool:
        if not lease.lease_id:
            return True
        try:
            call(f"{self.url}/api/v1/leases/{lease.lease_id}/renew",
                 {"peer_id": self.peer_id, "rows_done": rows_done}, self.timeout, self.auth)
        except CoordinatorGone as e:  # it extends live leases when it comes back
            logger.warning(f"could not renew lease {lease.lease_id}: {e}; reading on")
        except LeaseRefused as e:
            logger.warning(f"lease {lease.lease_id} on {lease.shard.key} is gone ({e}); another peer has the shard")
            return False
        return True

    def complete(self, lease: Lease, used: int, skipped: dict[str, int]) -> None:
        if not lease.lease_id:
            return
        self._undelivered.append((lease.lease_id, {"peer_id": self.peer_id, "used": used, "skipped": skipped}))
        try:
            self._deliver()
        except CoordinatorGone as e:
            logger.warning(f"could not report {lease.shard.key} done ({e}); will retry with the next lease request")

    def _deliver(self) -> None:
        """Send the completions not yet acknowledged, oldest first; keep them if the coordinator is down."""
        while self._undelivered:
            lease_id, body = self._undelivered[0]
            try:
                call(f"{self.url}/api/v1/leases/{lease_id}/complete", body, self.timeout, self.auth)
            except LeaseRefused as e:
                logger.warning(f"the coordinator did not accept lease {lease_id} as done: {e}")
            self._undelivered.pop(0)

    def release(self, lease: Lease, rows_done: int) -> None:
        if not lease.lease_id:
            return
        try:
            call(f"{self.url}/api/v1/leases/{lease.lease_id}/release",
                 {"peer_id": self.peer_id, "rows_done": rows_done}, timeout=3.0, auth=self.auth)
        except (CoordinatorGone, LeaseRefused) as e:
            logger.debug(f"could not release lease {lease.lease_id}: {e}")

    def max_empty_shards(self, worker: int, num_workers: int) -> int:
        return self.max_empty
