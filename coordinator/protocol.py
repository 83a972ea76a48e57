"""The records peers and the coordinator exchange through the hivemind DHT.

Every record lives under a key prefixed with the run id and a subkey that carries the writer's
public key; hivemind's `RSASignatureValidator` signs it and `SchemaValidator` type-checks it on
every DHT node that stores it, so a record that fails validation is dropped before anyone reads
it. hivemind's validators are written against pydantic's v1 API, hence `pydantic.v1` here.

Keys (with ``run_id="demo"``):
- ``demo_progress``   hivemind's own progress tracker (epoch = global step), read-only for us;
- ``demo_metrics``    one `PeerMetrics` per peer, refreshed every few seconds;
- ``demo_model``      the model each peer trains, so the coordinator can rebuild it for checkpoints;
- ``demo_checkpoint`` the coordinator's latest saved checkpoint, so peers know their work is safe;
- ``demo_coordinator`` the URLs of the coordinator's HTTP API (data leases), so peers need only
  ``--initial-peers``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import pydantic.v1 as pydantic
from hivemind import DHT
from hivemind.dht.schema import BytesWithPublicKey, RSASignatureValidator, SchemaValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import ValueWithExpiration, get_dht_time

logger = logging.getLogger(__name__)

NonNegInt = pydantic.conint(ge=0, strict=True)
NonNegFloat = pydantic.confloat(ge=0.0, strict=True)

METRICS_TTL = 60.0  # seconds a metrics record stays in the DHT without a refresh
MODEL_TTL = 600.0
CHECKPOINT_TTL = 600.0
COORDINATOR_TTL = 120.0


class PeerMetrics(pydantic.BaseModel):
    """What a peer reports about itself; the coordinator's status line and checkpoints read it."""

    peer_id: pydantic.StrictStr
    step: NonNegInt  # the global step (hivemind epoch) this peer is on
    loss: pydantic.StrictFloat  # mean training loss since the previous report (nan before the first batch)
    samples_per_second: NonNegFloat
    samples: NonNegInt  # samples this peer has trained on since it started
    bytes_sent: NonNegInt  # gradient-averaging payload bytes since start
    bytes_received: NonNegInt
    averaging_rounds: NonNegInt
    last_group_size: NonNegInt  # peers in this peer's latest gradient all-reduce (1 = averaged alone)
    compression_ratio: NonNegFloat  # fp32 bytes / bytes sent, per round, over the peer's latest rounds
    # gradient bytes sent per round over the peer's latest rounds (None: a peer that predates the field)
    bytes_per_round: Optional[NonNegFloat] = None
    skipped: Dict[pydantic.StrictStr, NonNegInt]
    final: pydantic.StrictBool = False  # the peer is about to leave (e.g. reached --max-steps)
    time: pydantic.StrictFloat


class ModelInfo(pydantic.BaseModel):
    """Enough to rebuild the peers' model with the same parameter shapes and name its classes."""

    name: pydantic.StrictStr
    depth: Optional[NonNegInt]
    num_classes: pydantic.conint(ge=1, strict=True)
    image_size: pydantic.conint(ge=8, strict=True)
    class_names: List[pydantic.StrictStr]
    compression: Optional[pydantic.StrictStr] = None  # e.g. "powersgd-8bit rank 4", for the model card
    ema: pydantic.StrictBool = False  # peers share an EMA of the weights after their parameters in the state
    # short hash of the settings that shape the optimizer state and the averaging (peer/config.py recipe_hash)
    recipe_hash: Optional[pydantic.StrictStr] = None


class CheckpointInfo(pydantic.BaseModel):
    step: NonNegInt
    path: pydantic.StrictStr
    time: pydantic.StrictFloat


class CoordinatorInfo(pydantic.BaseModel):
    """Where the coordinator's HTTP API answers: one URL per address it listens on; peers try each."""

    urls: List[pydantic.StrictStr]
    has_dataset: pydantic.StrictBool
    time: pydantic.StrictFloat


class RunSchema(pydantic.BaseModel):
    metrics: Dict[BytesWithPublicKey, Optional[PeerMetrics]]
    model: Dict[BytesWithPublicKey, Optional[ModelInfo]]
    checkpoint: Dict[BytesWithPublicKey, Optional[CheckpointInfo]]
    coordinator: Dict[BytesWithPublicKey, Optional[CoordinatorInfo]]


class RunRecords:
    """Typed reads and signed writes of one run's records in the DHT.

    Construct it once per process (it registers the validators on the DHT); peers and the
    coordinator use the same class, so both sides agree on keys and types.
    """

    def __init__(self, dht: DHT, run_id: str):
        self.dht, self.run_id = dht, run_id
        self._pending: list = []  # store futures not yet confirmed; see flush()
        signer = RSASignatureValidator()  # the process-wide key, the same one hivemind's tracker signs with
        self.public_key = signer.local_public_key
        dht.add_validators([SchemaValidator(RunSchema, prefix=run_id), signer])

    def _key(self, field: str) -> str:
        return f"{self.run_id}_{field}"

    def _store(self, field: str, record: pydantic.BaseModel, ttl: float) -> None:
        future = self.dht.store(
            self._key(field), subkey=self.public_key, value=record.dict(),
            expiration_time=get_dht_time() + ttl, return_future=True,
        )
        self._pending = [f for f in self._pending if not f.done()] + [future]

    def flush(self, timeout: float = 5.0) -> None:
        """Wait for our last records to be stored: call before shutting the DHT down, or the DHT process
        may still be unpickling a store request from a process that is already gone (a hivemind traceback)."""
        deadline = time.monotonic() + timeout
        for future in self._pending:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except (TimeoutError, OSError, RuntimeError) as e:
                logger.debug(f"a DHT record was not confirmed before shutdown: {e!r}")
        self._pending = []

    def _fetch(self, field: str, model: type[pydantic.BaseModel]) -> list:
        return list(self._fetch_by_owner(field, model).values())

    def _fetch_by_owner(self, field: str, model: type[pydantic.BaseModel]) -> dict[bytes, Any]:
        """Records keyed by their subkey: the owner's public key, which the signature validator checked."""
        found = self.dht.get(self._key(field), latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        records = {}
        for owner, entry in found.value.items():
            if isinstance(entry, ValueWithExpiration):
                try:
                    records[owner] = model.parse_obj(entry.value)
                except pydantic.ValidationError:
                    continue  # validators already drop bad records on store; this guards local caches
        return records

    def metrics_by_owner(self) -> dict[bytes, PeerMetrics]:
        """Peers' metrics records keyed by owner key: the same process-wide key that signs hivemind's progress
        records, so ``steps_of`` can vote for peers that have not trained yet (hivemind publishes no progress
        before the first samples)."""
        return self._fetch_by_owner("metrics", PeerMetrics)

    def publish_metrics(self, metrics: PeerMetrics) -> None:
        self._store("metrics", metrics, METRICS_TTL)

    def publish_model(self, info: ModelInfo) -> None:
        self._store("model", info, MODEL_TTL)

    def publish_checkpoint(self, info: CheckpointInfo) -> None:
        self._store("checkpoint", info, CHECKPOINT_TTL)

    def publish_coordinator(self, info: CoordinatorInfo) -> None:
        self._store("coordinator", info, COORDINATOR_TTL)

    def coordinator(self) -> Optional[CoordinatorInfo]:
        """The most recently announced coordinator API (any signer: access control is a later issue's)."""
        found = self._fetch("coordinator", CoordinatorInfo)
        return max(found, key=lambda c: c.time) if found else None

    def metrics(self) -> list[PeerMetrics]:
        return self._fetch("metrics", PeerMetrics)

    def models(self) -> list[ModelInfo]:
        return self._fetch("model", ModelInfo)

    def latest_checkpoint(self) -> Optional[CheckpointInfo]:
        found = self._fetch("checkpoint", CheckpointInfo)
        return max(found, key=lambda c: c.step) if found else None

    def progress(self) -> dict[bytes, LocalTrainingProgress]:
        """hivemind's own per-peer progress records (written by its ProgressTracker), by owner key."""
        return self._fetch_by_owner("progress", LocalTrainingProgress)


@dataclass(frozen=True)
class SwarmView:
    """The swarm as the coordinator sees it at one moment."""

    global_step: int
    num_peers: int  # training peers with a live progress record
    num_clients: int
    samples_accumulated: int  # towards the next global step
    samples_per_second: float


# How far above the epoch half the swarm has reached a claim may be and still be believed. Honest peers step
# together, but the votes of peers that have not trained yet come from metrics records a few seconds old, and a group
# that started first can be several fast steps ahead; a far-future claim (the attack) is far beyond this.
EPOCH_SLACK = 16


def steps_of(metrics: Mapping[bytes, PeerMetrics]) -> dict[bytes, int]:
    """Each live (not leaving) peer's step, by owner key: its vote in ``plausible_epoch_limit``."""
    return {owner: m.step for owner, m in metrics.items() if not m.final}


def plausible_epoch_limit(epochs: Sequence[int]) -> int:
    """The largest epoch claim worth believing: the epoch at least half the peers have reached, plus EPOCH_SLACK.

    hivemind takes the largest epoch any peer claims as the swarm's, so one peer that claims a far-future epoch
    would make every honest peer believe it is behind and reload its state, over and over. The ceil(n/2)-th
    largest claim (the upper median) moves only when half the peers do; a peer that joins late still sees the
    others' epoch, since they are the majority. Two peers cannot outvote each other: a pair trusts the larger claim.
    """
    if not epochs:
        return EPOCH_SLACK
    ordered = sorted(epochs, reverse=True)
    return ordered[(len(ordered) + 1) // 2 - 1] + EPOCH_SLACK


def swarm_view(progress: Mapping[bytes, LocalTrainingProgress], now: Optional[float] = None,
               steps: Mapping[bytes, int] = {}) -> SwarmView:  # noqa: B006 (read only)
    """Fold hivemind progress records (by owner key) into one view, the way our peers' tracker does.

    The global step is the largest plausible epoch a live training peer claims (``plausible_epoch_limit``, voted
    by every peer with a progress record and, from ``steps``, every peer known only by its metrics record; records
    are signed by their owners, so a peer can lie only about itself). Only peers on that step count towards the
    samples.
    """
    now = get_dht_time() if now is None else now
    live = {owner: p for owner, p in progress.items() if p.time <= now + 60}  # clocks far in the future: ignored
    votes = {**steps, **{owner: p.epoch for owner, p in live.items() if not p.client_mode}}
    limit = plausible_epoch_limit(list(votes.values()))
    live = list(live.values())
    live = [p for p in live if p.epoch <= limit]
    if not live:
        return SwarmView(0, 0, 0, 0, 0.0)
    global_step = max(p.epoch for p in live)
    return SwarmView(
        global_step=global_step,
        num_peers=sum(not p.client_mode for p in live),
        num_clients=sum(p.client_mode for p in live),
        samples_accumulated=sum(p.samples_accumulated for p in live if p.epoch == global_step),
        samples_per_second=sum(p.samples_per_second for p in live),
    )


def bytes_per_round(metrics: Iterable[PeerMetrics]) -> float:
    """Mean over the peers of the gradient bytes each sent per round in its latest rounds (nan before any round).

    The latest rounds, not since start: PowerSGD's 8-bit warm-up rounds would dominate a since-start mean for
    hundreds of steps. A peer that predates ``PeerMetrics.bytes_per_round`` counts with its since-start mean.
    """
    per_peer = [m.bytes_per_round if m.bytes_per_round is not None else m.bytes_sent / m.averaging_rounds
                for m in metrics if m.averaging_rounds > 0]
    return sum(per_peer) / len(per_peer) if per_peer else math.nan


def mean_loss(metrics: Iterable[PeerMetrics]) -> float:
    """Sample-rate-weighted mean of the peers' recent losses (nan when nobody reported one)."""
    pairs = [(m.loss, max(m.samples_per_second, 1e-9)) for m in metrics if math.isfinite(m.loss)]
    if not pairs:
        return math.nan
    return sum(loss * w for loss, w in pairs) / sum(w for _, w in pairs)
