"""The coordinator: the swarm's bootstrap DHT node, its data plan, its status line, and its checkpoints.

It never trains. An HTTP API (`http.py`, in its own thread) hands out data shards as leases from a
SQLite ledger (`leases.py`). Each tick the main loop reads the peers' progress and metrics from the
DHT, announces the API's URLs there, prints one status line, and when a checkpoint is due it downloads
the state from a peer, checks that the state is really at the step it is saving, and writes it with
`convforever.model.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hivemind
from hivemind.utils import get_dht_time

from convforever.model import ModelConfig, create_model
from convforever.model.checkpoint import save_checkpoint

from .access_http import PrivateRun
from .http import HttpServer, LeaseApi
from .hub import CardFacts, HubConfig, HubPublisher, Upload, loss_curve_png, model_card
from .leases import LeaseLedger
from .protocol import (
    EPOCH_SLACK,
    CheckpointInfo,
    CoordinatorInfo,
    ModelInfo,
    PeerMetrics,
    RunRecords,
    SwarmView,
    bytes_per_round,
    mean_loss,
    steps_of,
    swarm_view,
)
from .state import StateFetcher
from .status import RunHistory, StatusBoard, build_status
from .web import WebApi

logger = logging.getLogger(__name__)


@dataclass
class CoordinatorConfig:
    run_id: str
    checkpoint_dir: Path
    checkpoint_every: int = 10  # global steps between checkpoints
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/31337"])
    announce_maddrs: list[str] = field(default_factory=list)
    maddrs_file: Optional[Path] = None
    identity: Optional[Path] = None  # a fixed private key keeps the coordinator's multiaddr across restarts
    status_every: float = 5.0  # seconds between status lines
    state_timeout: float = 120.0
    # The data plan: None serves no leases (peers bring --data). It is stored in checkpoint_dir/leases.sqlite,
    # so a restart without --dataset resumes the stored plan.
    dataset: Optional[str] = None
    subset: Optional[str] = None  # e.g. pd12m or megalith-cc0 for Spawning/pd-extended
    shard_rows: int = 20_000  # rows per shard: a few minutes of a consumer GPU's training
    lease_ttl: float = 300.0  # seconds a lease lives without a renewal
    http_host: str = "0.0.0.0"
    http_port: int = 8000  # 0 picks a free port
    public_url: Optional[str] = None  # announce this URL instead of one per listening address
    # Publishing checkpoints to the Hugging Face Hub: --hub-repo ORG/NAME, or --org ORG for ORG/ConvForever-{run_id}.
    hub_repo: Optional[str] = None
    hub_private: bool = False
    # Access control (access.py): "private" runs admit only peers holding a certificate issued for a join token;
    # public_status keeps the page and /api/status open in a private run. cert_ttl: certificate lifetime (s).
    access: str = "public"
    public_status: bool = False
    cert_ttl: float = 600.0

    @property
    def ledger_path(self) -> Path:
        return self.checkpoint_dir / "leases.sqlite"

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1 global step, got {self.checkpoint_every}")
        if not self.run_id or "." in self.run_id or " " in self.run_id:
            raise ValueError(f"--run-id must be a non-empty name without dots or spaces, got {self.run_id!r}")
        if self.shard_rows < 1:
            raise ValueError(f"--shard-rows must be >= 1, got {self.shard_rows}")
        if self.lease_ttl < 5:
            raise ValueError(f"--lease-ttl must be >= 5 seconds, got {self.lease_ttl}")
        if self.hub_repo is not None:
            HubConfig(self.hub_repo)  # raises with what to pass instead
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"--http-port must be a TCP port (0 picks a free one), got {self.http_port}")
        if self.access not in ("public", "private"):
            raise ValueError(f"--access is public or private, got {self.access!r}")
        if self.cert_ttl < 60:
            raise ValueError(f"--cert-ttl must be >= 60 seconds (peers renew at half-life), got {self.cert_ttl}")


def checkpoint_due(global_step: int, last_saved: int, every: int) -> bool:
    """A checkpoint is due once the swarm has passed the next multiple of `every` after the last save."""
    return global_step > 0 and global_step // every > last_saved // every


def open_ledger(config: CoordinatorConfig) -> Optional[LeaseLedger]:
    """The stored plan if there is one (a restart), else a new plan of --dataset, else None."""
    from convforever.data.shards import plan_dataset

    if LeaseLedger.exists(config.ledger_path):
        ledger = LeaseLedger(config.ledger_path, ttl=config.lease_ttl)
        if config.dataset and ledger.spec != config.dataset:
            raise ValueError(f"{config.ledger_path} holds the plan of dataset {ledger.spec!r}, not {config.dataset!r}: "
                             "use a new --checkpoint-dir for a new dataset, or pass the same --dataset to resume")
        return ledger
    if not config.dataset:
        return None
    logger.info(f"planning shards of {config.dataset} ({config.shard_rows} rows each)")
    plan = plan_dataset(config.dataset, config.shard_rows, subset=config.subset)
    return LeaseLedger(config.ledger_path, plan, ttl=config.lease_ttl)


def api_urls(config: CoordinatorConfig, port: int, maddrs: list[str]) -> list[str]:
    """The URLs peers may reach the API at: --public-url, or the listening host, or every IPv4 the DHT sees."""
    if config.public_url:
        return [config.public_url.rstrip("/")]
    if config.http_host not in ("0.0.0.0", "::", ""):
        return [f"http://{config.http_host}:{port}"]
    hosts = [m.split("/")[2] for m in maddrs if m.startswith("/ip4/")]
    hosts = [h for h in hosts if h != "0.0.0.0"] or ["127.0.0.1"]
    return [f"http://{h}:{port}" for h in dict.fromkeys(hosts)]


def format_status(view: SwarmView, metrics: list[PeerMetrics], last_checkpoint: Optional[int],
                  data: Optional[dict] = None) -> str:
    loss = mean_loss(metrics)
    per_round = bytes_per_round(metrics)
    ratios = [m.compression_ratio for m in metrics if m.compression_ratio > 0]
    skipped = sum(sum(m.skipped.values()) for m in metrics)
    parts = [
        f"step {view.global_step}",
        f"peers {view.num_peers}" + (f"+{view.num_clients} clients" if view.num_clients else ""),
        f"loss {loss:.4f}" if math.isfinite(loss) else "loss -",
        f"{view.samples_per_second:.1f} samples/s",
        f"sent {per_round / 1e6 if math.isfinite(per_round) else 0.0:.2f} MB/round/peer"
        + (f" ({min(ratios):.0f}x vs fp32)" if ratios else ""),
        f"skipped {skipped}",
    ]
    if data is not None:
        parts.append(f"data pass {data['passes_completed']} {data['shards_done_this_pass']}/{data['shards']} shards "
                     f"({data['active_leases']} leased)")
    parts += [
        f"checkpoint step-{last_checkpoint}" if last_checkpoint is not None else "no checkpoint yet",
    ]
    return "[coordinator] " + " | ".join(parts)


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        if config.identity:
            config.identity.parent.mkdir(parents=True, exist_ok=True)
        # The plan and the API first: a dataset that cannot be planned or a busy port fails before the DHT starts.
        self.ledger = open_ledger(config)
        # The run's curves and leaderboard survive restarts next to the checkpoints; the page only reads the board.
        self.history = RunHistory(config.checkpoint_dir / "history.jsonl")
        self.board = StatusBoard()
        self.web = WebApi(self.board, checkpoint_dir=config.checkpoint_dir)
        self.private = PrivateRun(config.run_id, config.checkpoint_dir, config.identity, config.cert_ttl,
                                  config.public_status) if config.access == "private" else None
        routes = LeaseApi(self.ledger).routes() + self.web.routes() + (self.private.routes() if self.private else [])
        self.http = HttpServer(routes, config.http_host, config.http_port,
                               middlewares=self.private.middlewares() if self.private else ())
        port = self.http.start()
        try:
            self.dht = hivemind.DHT(
                start=True,
                host_maddrs=config.host_maddrs,
                announce_maddrs=config.announce_maddrs or None,
                **(self.private.member.dht_kwargs if self.private else
                   dict(identity_path=str(config.identity) if config.identity else None)),
            )
        except BaseException:
            self.http.stop()
            raise
        if self.private is not None:
            self.private.member.tick(self.dht)  # our certificate and the revocation list, before any peer asks
        self.records = RunRecords(self.dht, config.run_id)
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        if config.maddrs_file:
            config.maddrs_file.parent.mkdir(parents=True, exist_ok=True)
            config.maddrs_file.write_text("".join(m + "\n" for m in self.maddrs))
        self.api_urls = api_urls(config, port, self.maddrs)
        self.global_step = 0
        self.model_info: Optional[ModelInfo] = None
        self.fetcher: Optional[StateFetcher] = None
        self.hub = HubPublisher(HubConfig(config.hub_repo, private=config.hub_private)) if config.hub_repo else None
        self.last_saved = self._existing_checkpoint_step()
        self.last_path = str(self.config.checkpoint_dir / f"step-{self.last_saved}") if self.last_saved else ""

    def _existing_checkpoint_step(self) -> int:
        latest = self.config.checkpoint_dir / "latest"
        if latest.is_file():
            name = latest.read_text().strip()
            if name.startswith("step-") and name[5:].isdigit():
                return int(name[5:])
        return 0

    def _ensure_model(self) -> bool:
        """Learn the model from the peers' records; build the state fetcher once it is known."""
        models = self.records.models()
        if not models:
            return False
        counts = Counter(m.json() for m in models)
        info = ModelInfo.parse_raw(counts.most_common(1)[0][0])
        if len(counts) > 1:
            logger.warning(f"peers announce {len(counts)} different models; checkpointing the most common: {info.name}")
        if self.model_info is None:
            self.model_info = info
            try:
                model = create_model(ModelConfig(name=info.name, depth=info.depth, num_classes=info.num_classes))
            except ValueError as e:
                self.model_info = None
                logger.warning(f"peers announce a model this coordinator cannot build ({e}); not checkpointing")
                return False
            self.fetcher = StateFetcher(self.dht, self.config.run_id, model, timeout=self.config.state_timeout,
                                        access=self.private.member.verifier() if self.private else None)
            self.model_config = model.config
            logger.info(f"swarm trains {info.name} (depth={info.depth}, {info.num_classes} classes, {info.image_size}px)")
        return True

    def tick(self) -> str:
        by_owner = self.records.metrics_by_owner()  # one read serves the epoch vote and the status
        metrics = list(by_owner.values())
        view = swarm_view(self.records.progress(), steps=steps_of(by_owner))
        # The step does not go back when peers leave and their records expire, nor by one while the last records
        # are stale; it drops further only when the peers present outvote it (a liar believed while alone).
        if view.num_peers and (view.global_step > self.global_step
                               or self.global_step - view.global_step > EPOCH_SLACK):
            self.global_step = view.global_step
        view = dataclasses.replace(view, global_step=self.global_step)
        if self.private is not None:
            self.private.member.tick(self.dht)
        leaving = [m.step for m in metrics if m.final and m.step > self.last_saved]
        due = checkpoint_due(view.global_step, self.last_saved, self.config.checkpoint_every)
        if (due or leaving) and view.num_peers > 0 and self._ensure_model():
            self.checkpoint(max([view.global_step, *leaving]), metrics)
        # Re-announced every tick: peers at --max-steps wait for it, and it tells them a coordinator is there.
        self.records.publish_checkpoint(CheckpointInfo(step=self.last_saved, path=self.last_path, time=get_dht_time()))
        self.records.publish_coordinator(CoordinatorInfo(urls=self.api_urls, has_dataset=self.ledger is not None,
                                                         time=get_dht_time()))
        data = self.ledger.summary() if self.ledger is not None else None
        self.history.record(view, metrics)
        self.board.update(build_status(self.config.run_id, view, metrics, self.history, self.checkpoint_status(),
                                       data, initial_peers=self.maddrs))
        return format_status(view, metrics, self.last_saved or None, data)

    def checkpoint_status(self) -> Optional[dict]:
        """The latest checkpoint for the page: its Hub revision once published there, else its files here."""
        if not self.last_saved:
            return None
        url = self.web.checkpoint_url(self.last_path)
        if self.hub is not None and self.last_saved in self.hub.published:
            url = f"{self.hub.url}/tree/step-{self.last_saved}"
        return {"step": self.last_saved, "path": self.last_path, "url": url}

    def checkpoint(self, min_step: int, metrics: list[PeerMetrics]) -> Optional[Path]:
        assert self.fetcher is not None and self.model_info is not None
        fetched = self.fetcher.fetch(min_step=min_step, with_ema=self.model_info.ema)
        if fetched is None:
            return None
        loss = mean_loss(metrics)
        meta = {
            "run_id": self.config.run_id,
            "model": self.model_config.to_dict(),
            "image_size": self.model_info.image_size,
            "class_names": self.model_info.class_names,
            "loss": loss if math.isfinite(loss) else None,
            "peers": len(metrics),
            "time": time.time(),
        }
        path = save_checkpoint(self.config.checkpoint_dir, fetched.step, fetched.state_dict, meta,
                               ema_state_dict=fetched.ema_state_dict)
        self.last_saved, self.last_path = fetched.step, str(path)
        logger.info(f"saved checkpoint {path} (loss {loss:.4f})")
        if self.hub is not None:  # only a fresh, verified state gets here: the fetcher refused stale ones
            self.hub.submit(self._upload(fetched.step, path, loss))
        return path

    def _upload(self, step: int, path: Path, loss: float) -> Upload:
        assert self.model_info is not None and self.hub is not None
        history = self.history_points()
        facts = CardFacts(
            run_id=self.config.run_id, repo_id=self.hub.config.repo_id, step=step, loss=loss,
            model=self.model_config.to_dict(), image_size=self.model_info.image_size,
            class_names=self.model_info.class_names, dataset=self.ledger.spec if self.ledger else None,
            data=self.ledger.summary() if self.ledger else None, compression=self.model_info.compression,
            history=history,
        )
        curve = [(p["global_step"], p["loss"] if p.get("loss") is not None else math.nan) for p in history]
        return Upload(step=step, step_dir=path, loss=loss, card=model_card(facts), curve_png=loss_curve_png(curve))

    def history_points(self) -> list[dict]:
        """The run's time series (global_step, loss, samples_per_second, peers_online per tick)."""
        return self.history.point_dicts()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            print(self.tick(), flush=True)
            stop.wait(self.config.status_every)

    def shutdown(self) -> None:
        self.history.flush_peers()
        if self.hub is not None:
            self.hub.close()
        self.http.stop()
        if self.ledger is not None:
            self.ledger.close()
        self.records.flush()
        if self.fetcher is not None:
            self.fetcher.shutdown()
        self.dht.shutdown()
        if self.private is not None:
            self.private.close()
