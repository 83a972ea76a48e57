"""One volunteer peer: a local ConvNeXt training loop whose optimizer steps are taken by the swarm.

The loop itself is nanoGPT-short: forward, backward, `opt.step()`. `hivemind.Optimizer` does the
rest: it accumulates local gradients until the swarm as a whole has `target_batch_size` samples,
all-reduces them (compressed, see `convforever.compression`) and applies the same AdamW step on
every peer, so the global step (hivemind's "epoch") advances in lock-step across the swarm.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
import zlib
from collections import Counter
from functools import partial
from typing import Optional, Sequence

import hivemind
import torch
from hivemind.averaging.control import AveragingStage
from hivemind.p2p import P2PDaemonError
from hivemind.utils import get_dht_time

from convforever.compression import TrafficCounters, TrafficSnapshot, build_averaging_kwargs
from convforever.compression.guard import GuardedTrainingStateAverager
from convforever.coordinator.process import keep_signal_handlers
from convforever.coordinator.protocol import METRICS_TTL, MODEL_TTL, ModelInfo, PeerMetrics, RunRecords, steps_of
from convforever.data import CATEGORIES, DataConfig, make_loader
from convforever.data.augment import augment_batch, augment_loss
from convforever.model import create_model, flat_parameter_names
from convforever.model.checkpoint import load_checkpoint, save_checkpoint

from .accel import autocast, grad_scaler, optimizer_class, prepare_model, resolve_precision
from .access import AuthorizedFactory, join_private_run, start_authorized
from .config import PeerConfig, recipe_hash
from .leases import CoordinatorShards, reachable_url
from .progress import PlausibleProgressTracker
from .recipe import WeightEMA, blur_batch, build_optimizer_setup
from .report import ProgressWindow, RecentRounds, format_progress

logger = logging.getLogger(__name__)


class SwarmUnreachable(RuntimeError):
    """No initial peer answered: the user must fix the address or start the coordinator."""


KNOWN_STEPS_REFRESH = 5.0  # seconds between reads of the peers' metrics records for the epoch vote
# A downloaded state is refused when its loss on our latest batch is above our own parameters' by more than this
# fraction of ours (at least STATE_LOSS_SLACK): measured in test_poisoning, the -1e6x peer's state scored 7.0
# where the honest peers' own scored 3.9; an honest swarm's state scores at or below a peer that fell behind it.
STATE_LOSS_MARGIN = 0.25
STATE_LOSS_SLACK = 0.5


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that remembers how many peers each gradient all-reduce really had.

    hivemind only logs the group size; we need it in the progress line and in the metrics, since
    a peer that keeps averaging alone is the first sign of a swarm falling apart.
    """

    def __init__(self, access=None, **kwargs):
        self.access = access  # a private run's CertificateVerifier (peer/access.py); hivemind's __init__ needs it
        self.last_group_size = 0
        self.group_sizes: Counter = Counter()  # group size -> global steps taken in a group of that size (1 = alone)
        super().__init__(**kwargs)
        if hasattr(self.grad_averager, "epoch_source"):  # PowerSGD's warm-up: rounds carry the epoch they close
            self.grad_averager.epoch_source = lambda: self.local_epoch

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> PlausibleProgressTracker:
        # hivemind's own method with the class swapped: a peer claiming a far-future epoch is not believed
        return PlausibleProgressTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                        client_mode=self.client_mode, status_loglevel=self.status_loglevel,
                                        start=True, **kwargs)

    def _make_state_averager(self, **kwargs) -> GuardedTrainingStateAverager:
        # hivemind's own method with the class swapped: state-averaging rounds drop NaN or absurd parameters too
        averager = GuardedTrainingStateAverager(
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=self.access is None, **kwargs,
        )
        # A private run: the access checks go in before the averager's process starts (peer/access.py).
        return averager if self.access is None else start_authorized(averager, self.access)

    def _update_global_epoch(self, grad_scaler):
        self._group_size = 1  # stays 1 when hivemind decides there is nobody to average with
        super()._update_global_epoch(grad_scaler)
        self.last_group_size = self._group_size
        self.group_sizes[self._group_size] += 1

    def leave_pending_round(self) -> bool:
        """Cancel our next gradient round if it is still matchmaking; True if one was cancelled.

        Used on Ctrl+C: a peer blocked in a round whose groupmates have already left would otherwise wait out the
        averaging timeout ("could not find a group", 30 s by default) before it can exit. A round that is already
        exchanging tensors is left to finish (seconds), so the groupmates get our parts.
        """
        control = self.scheduled_grads
        if control is None or control.done() or control.stage == AveragingStage.RUNNING_ALLREDUCE:
            return False
        return control.cancel()

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        control = maybe_step_control
        if control is not None and control.done() and not control.cancelled() and control.exception() is None:
            self._group_size = len(control.result())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def initial_seed(run_id: str) -> int:
    """Every peer of a run starts from the same weights, so peers that start at once already agree."""
    return zlib.crc32(run_id.encode())


class Peer:
    needs_data = True  # a training peer reads data (its own --data or the coordinator's shards); a replica does not

    def __init__(self, config: PeerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        if config.threads is not None:
            # Several CPU peers on one machine each default to every core; their spinning OpenMP
            # threads then starve one another (measured here: one peer at 1/10 of the other's speed).
            torch.set_num_threads(config.threads)
        # A private run: exchange the join token for a certificate first, since the DHT runs as the certified key.
        self.access = join_private_run(config.coordinator_url, config.token, config.run_id) if config.token else None
        try:
            self.dht = hivemind.DHT(
                initial_peers=config.initial_peers,
                host_maddrs=config.host_maddrs,
                announce_maddrs=config.announce_maddrs or None,
                client_mode=config.client_mode,  # hivemind.Optimizer ignores its own client_mode argument
                start=True,
                **(self.access.dht_kwargs if self.access else {}),
            )
        except P2PDaemonError as e:
            if self.access is not None:
                self.access.close()
            raise SwarmUnreachable(
                f"could not join the swarm through --initial-peers {' '.join(config.initial_peers)}: {e}. "
                "Check that the coordinator is running and that the multiaddrs are the ones it printed "
                "(its --maddrs-file), including the /p2p/... part."
            ) from None
        if self.access is not None:
            self.access.client.start(self.dht)  # publish our certificate, renew it in the background
        self.records = RunRecords(self.dht, config.run_id)
        self.known_steps: dict[bytes, int] = {}  # owner key -> step, refreshed by the main thread
        self.known_steps_read = -math.inf
        data_seed = config.seed if config.seed is not None else int.from_bytes(self.dht.peer_id.to_bytes()[-4:], "big")
        self.source, self.loader = None, None
        if self.needs_data:
            try:  # the data first: a wrong --data or an unreachable coordinator fails before the optimizer starts
                self.source = None if config.data is not None else self._lease_source()
                self.loader = make_loader(DataConfig(
                    files=config.data or "", image_size=config.image_size, batch_size=config.batch_size,
                    train=True, num_workers=config.num_workers, seed=data_seed, num_classes=config.model.num_classes,
                    labels=config.labels, randaugment=config.augment.randaugment,
                    pin_memory=self.device.type == "cuda",
                ), self.source)
            except BaseException:
                self.dht.shutdown()
                raise
        torch.manual_seed(initial_seed(config.run_id))
        self.model = create_model(config.model)
        if config.init_from:
            self._init_from(config.init_from)
        try:
            self.precision = resolve_precision(config.precision, self.device)
            optimizer_cls = optimizer_class(config.optimizer)
        except ValueError:
            self.dht.shutdown()
            raise
        channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        self.forward = prepare_model(self.model, self.device, channels_last=channels_last, compile=config.compile,
                                     checkpointing=config.checkpointing)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.scaler = grad_scaler(self.precision)
        # Erasing and mixing draw from their own generator, seeded like the data order (peers differ, runs repeat).
        self.augment_rng = torch.Generator(device=self.device).manual_seed(data_seed)
        recipe = config.recipe
        self.ema = WeightEMA(self.model, recipe.ema_decay, recipe.ema_warmup, recipe.ema_device,
                             reset_on_jump=False) if recipe.ema else None
        logger.info(f"local step: {self.device}, {self.precision.name}, channels_last={channels_last}, "
                    f"compile={config.compile}, checkpointing={config.checkpointing}, optimizer={config.optimizer}")
        self.counters = TrafficCounters()
        self.recent = RecentRounds()  # per-round figures of the latest window with a round, for the line and metrics
        self.model_info = ModelInfo(
            name=config.model.name, depth=config.model.depth, num_classes=config.model.num_classes,
            image_size=config.image_size, class_names=list(CATEGORIES[: config.model.num_classes]),
            compression=f"{config.compression.mode} rank {config.compression.rank}"
            if config.compression.mode.startswith("powersgd") else config.compression.mode,
            ema=config.recipe.ema, recipe_hash=recipe_hash(config),
        )
        try:
            with keep_signal_handlers():
                self.opt = self.make_optimizer(self.optimizer_kwargs(optimizer_cls))
        except BaseException:
            self.dht.shutdown()
            raise
        self.window = ProgressWindow()
        self.last_loss = math.nan
        self.model_published = -math.inf
        # (images, labels) not yet stepped on: what a downloaded state is scored on (check_downloaded_state)
        self.probe_batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.opt.state_averager.state_check = self.check_downloaded_state

    def optimizer_kwargs(self, optimizer_cls) -> dict:
        """The SwarmOptimizer's arguments: the swarm's recipe, averaging and compression, for every role.

        hivemind names the averagers' RPC handlers after their classes and matches peers by the run id, so a
        peer that builds its optimizer any other way (a replica included) cannot join the others' rounds.
        """
        config = self.config
        setup = build_optimizer_setup(self.model, config.recipe, optimizer_cls)
        averaging = build_averaging_kwargs(config.compression, self.counters, list(self.model.parameters()))
        # hivemind warns (and can deadlock) when a matchmaking request may outlive matchmaking itself.
        # Optimizer(averager_opts=...) only reaches the state averager, so the gradient averager gets it here.
        request_timeout = min(3.0, config.matchmaking_time / 2)
        factory = averaging["grad_averager_factory"]
        averaging["grad_averager_factory"] = partial(factory, request_timeout=request_timeout)
        verifier = self.access.client.verifier() if self.access is not None else None
        if verifier is not None:  # a private run: only certified peers average with us or download our state
            averaging["grad_averager_factory"] = AuthorizedFactory(averaging["grad_averager_factory"], verifier)
        return dict(
            dht=self.dht,
            run_id=config.run_id,
            params=setup.params,
            optimizer=setup.optimizer,
            scheduler=setup.scheduler,
            # The EMA travels with the state: joiners download the swarm's, the coordinator checkpoints it.
            extra_tensors=self.ema.flat_tensors(flat_parameter_names(self.model)) if self.ema else (),
            offload_optimizer=config.offload_optimizer,
            # hivemind's GradScaler unscales only the .grad buffers; with fp16 they must be the accumulators.
            reuse_grad_buffers=self.precision.scaled,
            batch_size_per_step=config.batch_size,
            target_batch_size=config.target_batch_size,
            matchmaking_time=config.matchmaking_time,
            averaging_timeout=config.averaging_timeout,
            average_state_every=config.average_state_every,
            averager_opts=dict(request_timeout=request_timeout),
            # While a tracker believes it is alone it refreshes every default_refresh_period (3 s); a
            # peer that reaches the target batch before it has seen the others steps alone and drifts.
            # steps: read from the main thread (refresh_known_steps); the tracker's thread only reads the dict.
            tracker_opts=dict(default_refresh_period=1.0, steps=lambda: self.known_steps),
            # hivemind's per-round lines ("Averaged gradients with 3 peers", ...) at INFO: shown with -v only, since
            # setup_logging keeps the hivemind logger at WARNING otherwise
            verbose=True,
            access=verifier,
            **averaging,
        )

    def make_optimizer(self, kwargs: dict) -> SwarmOptimizer:
        return SwarmOptimizer(**kwargs)

    def _lease_source(self, wait: float = 30.0) -> CoordinatorShards:
        """Shards from the coordinator: its URL from --coordinator or from its announcement in the DHT."""
        urls, deadline = [self.config.coordinator_url] if self.config.coordinator_url else [], time.monotonic() + wait
        while not urls:
            info = self.records.coordinator()
            if info is not None:
                if not info.has_dataset:
                    raise ValueError("the coordinator hands out no data (it was started without --dataset): "
                                     "pass --data PATH to train on your own files")
                urls = info.urls
            elif time.monotonic() > deadline:
                raise ValueError(f"no coordinator announced its API in the swarm within {wait:.0f}s: pass "
                                 "--coordinator URL, or --data PATH to train on your own files")
            else:
                time.sleep(1.0)
        url = reachable_url(urls)
        if url is None:
            raise ValueError(f"the coordinator's API does not answer at {' '.join(urls)}: check that this machine "
                             "can reach it (firewall, --public-url on the coordinator), or pass --coordinator URL")
        logger.info(f"training on shards leased from the coordinator at {url}")
        return CoordinatorShards(url, str(self.dht.peer_id), data_root=self.config.data_root,
                                 auth=self.access.client.signer() if self.access is not None else None)

    def _init_from(self, spec: str) -> None:
        """Load a checkpoint's weights (before the optimizer copies them); its architecture must be ours."""
        try:
            loaded, meta = load_checkpoint(spec)
        except (FileNotFoundError, ValueError) as e:
            self.dht.shutdown()
            raise ValueError(f"--init-from {spec}: {e}") from None
        shape_keys = ("name", "depths", "dims", "num_classes", "in_chans", "version", "conv_mlp")
        ours, theirs = self.model.config.to_dict(), loaded.config.to_dict()
        if any(ours[k] != theirs[k] for k in shape_keys):
            self.dht.shutdown()
            raise ValueError(f"--init-from {spec} holds {meta['model']['name']} (depths {meta['model']['depths']}, "
                             f"{meta['model']['num_classes']} classes); pass the same --model/--depth/--num-classes")
        self.model.load_state_dict(loaded.state_dict())
        logger.info(f"initialised from {spec} (its step {meta.get('step')})")

    @property
    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def wait_for_peers(self, stop: threading.Event) -> None:
        """Hold off training until --min-peers training peers (us included) are in the swarm.

        Peers that start together would otherwise each reach the target batch alone before their
        progress trackers have seen one another, step apart, and spend the run re-downloading state.
        """
        announced = 0.0
        self.publish(math.nan, 0.0)  # hivemind's tracker stays silent until a peer has samples: say we are here
        while not stop.is_set():
            now = get_dht_time()
            self.refresh_known_steps()
            seen = len({m.peer_id for m in self.records.metrics() if not m.final and m.time > now - METRICS_TTL})
            if seen >= self.config.min_peers:
                return
            if time.monotonic() - announced > 10:
                print(f"waiting for peers: {seen} of --min-peers {self.config.min_peers} online", flush=True)
                announced = time.monotonic()
            stop.wait(0.5)

    def join(self, stop: threading.Event) -> None:
        """Catch up with the swarm: download the newest state if anyone is ahead of us."""
        self.wait_for_peers(stop)
        self.opt.load_state_from_peers()
        # hivemind returns None both when it loaded a state and when it refused a stale one, so
        # compare epochs ourselves; Optimizer.step() retries whenever we are out of sync.
        global_step = self.opt.tracker.global_epoch
        if self.opt.local_epoch + 1 < global_step:
            logger.warning(
                f"could not load a fresh state (we are at step {self.opt.local_epoch}, the swarm at {global_step}); "
                "training will retry the download when it next finds itself out of sync"
            )
        else:
            logger.info(f"joined run {self.config.run_id!r} at global step {self.opt.local_epoch}")

    @torch.no_grad()
    def check_downloaded_state(self, parameters: Sequence[torch.Tensor]) -> Optional[str]:
        """Why a state downloaded from a peer must not replace ours (None: load it). hivemind's state averager calls
        this before applying the state (compression/guard.py, CheckedDownloadMixin), with the parameters in its
        optimizer's order.

        Refused: non-finite parameters, or a loss on our latest batch well above what our own parameters score
        (STATE_LOSS_MARGIN). The batch must be one we have not stepped on: on our first batch, once trained on, a
        peer scored 1.82 against its honest groupmates' 3.84 and refused them. A peer whose own loss is not finite
        takes any finite state.
        """
        if not all(bool(torch.isfinite(p).all()) for p in parameters):
            return "non-finite parameters"
        if self.probe_batch is None:
            return None
        names = {id(p): name for name, p in self.model.named_parameters()}
        ordered = [p for group in self.opt.state_averager.optimizer.param_groups for p in group["params"]]
        if len(ordered) != len(parameters) or any(id(p) not in names for p in ordered):
            return None  # an offloaded optimizer holds copies; nothing to score them against
        loaded = {names[id(p)]: t.to(self.device) for p, t in zip(ordered, parameters, strict=True)}
        ours, theirs = self._probe_loss(None), self._probe_loss(loaded)
        if not math.isfinite(ours):
            return None
        if not math.isfinite(theirs) or theirs > ours + max(STATE_LOSS_SLACK, STATE_LOSS_MARGIN * ours):
            return f"loss {theirs:.3g} on our data, where our own parameters score {ours:.3g}"
        return None

    def _probe_loss(self, parameters: Optional[dict]) -> float:
        """Cross-entropy of the probe batch, with our parameters or (``parameters``) others in their place."""
        training = self.model.training
        self.model.eval()
        try:
            images, labels = (tensor.to(self.device) for tensor in self.probe_batch)
            images = images.contiguous(memory_format=self.memory_format)
            with autocast(self.precision, self.device):
                logits = self.model(images) if parameters is None else \
                    torch.func.functional_call(self.model, parameters, (images,), strict=False)
            return torch.nn.functional.cross_entropy(logits.float(), labels).item()
        finally:
            self.model.train(training)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.probe_batch = images, labels  # our parameters have not stepped on it yet when a download comes in step()
        self.model.train()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.config.recipe.blur_steps:  # the blur curriculum, keyed to the global step like every schedule
            images = blur_batch(images, self.opt.local_epoch, self.config.recipe, self.augment_rng)
        images = images.contiguous(memory_format=self.memory_format)
        images, targets = augment_batch(images, labels, self.config.model.num_classes, self.augment_rng, self.config.augment)
        with autocast(self.precision, self.device):
            loss = augment_loss(self.forward(images), targets, self.config.augment)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        value = loss.item()
        if not self.precision.scaled and not math.isfinite(value):
            # Never hand the swarm a NaN: drop this batch's gradients before hivemind accumulates them. (fp16's
            # GradScaler makes hivemind skip such a step itself; its .grad buffers hold earlier batches too.)
            self.opt.zero_grad()
            return value
        # Accumulates; every target_batch_size swarm samples hivemind averages, (un)scales and steps.
        self.opt.step(grad_scaler=self.scaler)
        if not self.precision.scaled:  # with reuse_grad_buffers hivemind resets the .grad buffers itself
            self.opt.zero_grad()
        if self.ema is not None:
            self.ema.on_global_step(self.model, self.opt.local_epoch)
        return value

    def finished(self) -> bool:
        return self.config.max_steps is not None and self.opt.local_epoch >= self.config.max_steps

    def run(self, stop: threading.Event) -> None:
        # The first batch before anything else: a peer whose data pipeline is still starting (worker processes,
        # a first shard from the Hub) would otherwise announce itself, let the others reach the target batch
        # alone, and spend its first steps re-downloading the state they made without it.
        batches = iter(self.loader)
        first = next(batches)
        self.probe_batch = first.images, first.labels
        self.join(stop)
        last_report = time.monotonic()
        left = threading.Event()
        threading.Thread(target=self._leave_rounds_on_stop, args=(stop, left), name="leave-on-stop", daemon=True).start()
        try:
            for batch in itertools.chain([first], batches):
                if stop.is_set() or self.finished():
                    break
                loss = self.train_step(batch.images, batch.labels)
                if math.isfinite(loss):
                    self.window.observe(loss, len(batch.labels), batch.skipped)
                else:
                    self.window.skip(Counter(batch.skipped) + Counter(nonfinite_loss=len(batch.labels)))
                if time.monotonic() - last_report >= self.config.report_every:
                    self.report()
                    last_report = time.monotonic()
        finally:
            left.set()
        self.report(final=self.finished())
        sizes = dict(sorted(self.opt.group_sizes.items()))
        logger.info(f"leaving at global step {self.opt.local_epoch}; all-reduce group sizes: {json.dumps(sizes)}")
        if self.finished():
            self.wait_for_checkpoint(stop)

    def _leave_rounds_on_stop(self, stop: threading.Event, left: threading.Event) -> None:
        """Once ``stop`` is set, keep cancelling gradient rounds that are still matchmaking until the loop has left.

        A loop, not one cancel: the step under way when Ctrl+C came may schedule the next round after we looked.
        """
        stop.wait()
        while not left.is_set():
            if self.opt.leave_pending_round():
                logger.info("left the pending averaging round to exit; this step uses local gradients")
            left.wait(0.2)

    def report(self, final: bool = False) -> None:
        loss, rate = self.window.close()
        loss = self.last_loss = loss if math.isfinite(loss) else self.last_loss  # an empty window keeps the last loss
        traffic = self.counters.snapshot()
        recent = self.recent.update(traffic)
        peers = self.opt.tracker.global_progress.num_peers
        print(format_progress(self.opt.local_epoch, loss, rate, peers, traffic, self.opt.last_group_size,
                              self.window.skipped, recent), flush=True)
        self.publish(loss, rate, final, traffic)

    def refresh_known_steps(self) -> None:
        """The peers' steps from their metrics records, for the progress tracker's plausibility vote."""
        if time.monotonic() - self.known_steps_read > KNOWN_STEPS_REFRESH:
            self.known_steps_read = time.monotonic()
            self.known_steps = steps_of(self.records.metrics_by_owner())

    def publish(self, loss: float, rate: float, final: bool = False, traffic: Optional[TrafficSnapshot] = None) -> None:
        """Tell the swarm (and the coordinator's status line and checkpoints) how we are doing."""
        self.refresh_known_steps()
        traffic = traffic or self.counters.snapshot()
        recent = self.recent.latest  # per-round figures: the latest report window with a round (RecentRounds)
        if time.monotonic() - self.model_published > MODEL_TTL / 2:  # static: refresh it before it expires
            self.records.publish_model(self.model_info)
            self.model_published = time.monotonic()
        self.records.publish_metrics(PeerMetrics(
            peer_id=str(self.dht.peer_id), step=self.opt.local_epoch, loss=float(loss), samples_per_second=float(rate),
            samples=self.window.samples, bytes_sent=traffic.grad_bytes_sent, bytes_received=traffic.grad_bytes_received,
            averaging_rounds=traffic.grad_rounds, last_group_size=self.opt.last_group_size,
            compression_ratio=float(recent.ratio_vs_fp32) if recent is not None else 0.0,
            bytes_per_round=float(recent.bytes_per_round_sent) if recent is not None else None,
            skipped=dict(self.window.skipped), final=final, time=get_dht_time(),
        ))

    def wait_for_checkpoint(self, stop: threading.Event) -> None:
        """At --max-steps, keep serving our state until the coordinator has checkpointed it (no lost work)."""
        step, deadline = self.opt.local_epoch, time.monotonic() + self.config.exit_grace
        checkpoint = self.records.latest_checkpoint()
        if checkpoint is None:
            logger.info("no coordinator has announced checkpoints; leaving without waiting")
            return
        logger.info(f"reached step {step}; waiting up to {self.config.exit_grace:.0f}s for the coordinator's checkpoint")
        while checkpoint is None or checkpoint.step < step:
            if stop.is_set() or time.monotonic() > deadline:
                logger.warning(f"leaving before the coordinator checkpointed step {step}; the newest checkpoint is "
                               f"{checkpoint.step if checkpoint else 'unknown'}")
                return
            stop.wait(1.0)
            checkpoint = self.records.latest_checkpoint()
        logger.info(f"the coordinator saved step {checkpoint.step} at {checkpoint.path}")

    def close(self) -> None:
        if self.config.save_on_exit is not None:
            meta = {"run_id": self.config.run_id, "model": self.model.config.to_dict(), "image_size": self.config.image_size,
                    "class_names": self.model_info.class_names, "peer_id": str(self.dht.peer_id)}
            path = save_checkpoint(self.config.save_on_exit, self.opt.local_epoch, self.model.state_dict(), meta)
            logger.info(f"saved this peer's weights to {path}")
        self.records.flush()
        self.opt.shutdown()
        self.dht.shutdown()
        if self.access is not None:
            self.access.close()
