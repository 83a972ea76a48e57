"""A state replica: a peer that follows the swarm's every step without training, and serves its state to joiners.

It builds the training peers' exact optimizer (`Peer.optimizer_kwargs`: the same seeded model, recipe, EMA extra
tensors, compressed gradient averager), joins every gradient all-reduce with weight 0 (it never accumulates samples,
so hivemind's GradientAverager sends zeros with `control.weight = 0`), receives the averaged gradient like everyone
else and applies the same optimizer step: its parameters stay as close to a training peer's as two training peers'
are, without ever downloading the state. hivemind's progress tracker publishes no record for a peer with no samples,
so the training peers (and the coordinator's "peers N") do not count it, and it publishes no metrics, so it does not
count towards --min-peers either.

It advertises its state with priority `local_epoch + 0.5`: a joiner sorts the state holders by priority, so it
downloads from the replica rather than from a training peer at the same step (which would lose time serving it),
while a training peer a step ahead still wins.

A round it could not follow (averaging failed, or the training peers stepped alone: hivemind would step with zero
or stale gradients) makes it stop serving and reload the state from a training peer: at once the first time, then
2, 4, 8... up to 30 s after the last reload ended while rounds keep failing (a loop of reloads would keep a
training peer busy serving it). Until the reload it holds still, with no step of its own: AdamW stepping on our zero
gradients still moves the weights (momentum, weight decay), away from the swarm's. A round of ours not yet looking
for its group is dropped; one already forming gets our weight 0, so no group waits on us or loses its leader. It refuses to start when its recipe (the settings
`config.recipe_hash` covers) differs from the one most of the swarm's peers publish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Optional

import torch
from hivemind.averaging.control import AveragingStage

from .config import PeerConfig
from .trainer import Peer, SwarmOptimizer

logger = logging.getLogger(__name__)

PRIORITY_BONUS = 0.5  # above a training peer at the same step, below one a step ahead
FIRST_RELOAD_DELAY = 1.0  # the least time between reloads; it doubles with each reload until a round is followed
MAX_RELOAD_DELAY = 30.0
STEP_EVERY = 0.05  # seconds between opt.step() polls


class ReplicaStopped(Exception):
    """Stopped (SIGINT/SIGTERM) while waiting for the swarm's recipe."""


class ReplicaOptimizer(SwarmOptimizer):
    """hivemind.Optimizer that contributes no gradients (weight 0) but applies every averaged step."""

    def __init__(self, **kwargs):
        self.needs_reload = False
        self.last_reload = -float("inf")
        self.reload_delay = FIRST_RELOAD_DELAY
        self._holding = False  # out of sync, waiting for the next reload: no step until then
        self.missed_rounds = 0
        self.reloads = 0
        self._round_failed = False
        super().__init__(**kwargs)
        self._advertise()

    # --- no samples: weight 0 in every gradient round ---------------------------------------------------
    def _check_and_accumulate_gradients(self, batch_size, grad_scaler) -> bool:
        # Never call grad_averager.accumulate_grads_: with batch_size 0 it divides by its anchor batch size (0).
        # local_samples_accumulated stays 0, so GradientAverager.step sets control.weight = 0 and sends zeros.
        # hivemind's tracker publishes no record while samples_accumulated is 0: the swarm does not count us.
        if self._holding:
            return False  # hivemind's "start over": Optimizer.step returns before it would apply our zeros as a step
        if self.tracker.local_progress.epoch != self.local_epoch:
            self.tracker.report_local_progress(self.local_epoch, 0)
        return True

    # --- a round we could not follow must not be served ---------------------------------------------------
    def _update_global_epoch(self, grad_scaler) -> None:
        self._round_failed = False
        super()._update_global_epoch(grad_scaler)
        if self._round_failed:
            self.missed_rounds += 1
            self.needs_reload = True
            self.state_averager.allow_state_sharing = False  # a state stepped with zero gradients is wrong
            logger.warning(f"replica missed the gradient round of step {self.local_epoch - 1}; will reload the state")
        elif not self.needs_reload:
            self.reload_delay = FIRST_RELOAD_DELAY  # a round followed: the next miss reloads at once again
            self._advertise()
        if hasattr(self.grad_averager, "_ms"):
            # PowerSGD error feedback: our local "gradient" is 0, so _ms would only accumulate -(P Q^T) every round.
            # It has weight 0 in the average, but keep it bounded (0 * inf = nan in the reducer).
            with torch.no_grad():
                for m in self.grad_averager._ms:
                    m.zero_()

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        began = super()._begin_averaging_gradients(grad_scaler)
        if not began:  # nobody to average with: the .grad buffers hold no averaged gradient
            self._round_failed = True
        return began

    def _load_local_gradients_into_optimizer(self):
        self._round_failed = True  # averaging failed or was skipped: the "local gradients" are our zeros
        super()._load_local_gradients_into_optimizer()

    def _load_averaged_gradients_into_optimizer_(self):
        super()._load_averaged_gradients_into_optimizer_()
        params = [p for group in self.state_averager.optimizer.param_groups for p in group["params"]]
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
            self._round_failed = True  # e.g. a group whose weights sum to 0 (0/0 in the reducer)

    # --- out of sync: reload, but never in a loop -----------------------------------------------------------
    def _should_load_state_from_peers(self) -> bool:
        # Stricter than hivemind's (which lets a peer one step behind go on): a replica one step behind has missed
        # a round, and would apply the next round's gradient as its own step, one step late, forever.
        # ...but one step behind with our round for this step still in flight is only late: the trainers moved on
        # as their part of the round ended, ours may end a moment later. The round's outcome decides (a failed
        # round sets needs_reload in _update_global_epoch); marking it now kept a replica that averaged every round
        # out of sync, not serving, until its next reload (seen in test_replica on a loaded box).
        in_flight = self.scheduled_grads is not None and not self.scheduled_grads.done()
        behind = self.local_epoch < self.tracker.global_epoch - (1 if in_flight else 0)
        wanted = self.needs_reload or behind or super()._should_load_state_from_peers()
        self._holding = False
        if wanted:
            self.needs_reload = True
            self.state_averager.allow_state_sharing = False  # never serve a state the swarm did not compute
            if time.monotonic() - self.last_reload < self.reload_delay:
                self._holding = True
                self._leave_scheduled_rounds()
                return False
        return wanted

    def _leave_scheduled_rounds(self) -> None:
        """While we hold still, no group may wait on our part: a round not yet looking for its group is dropped, one
        already forming or formed gets our weight 0 (as hivemind's own load_state_from_peers does: cancelling a
        group we lead would send its members back to matchmaking). Blocks up to the averaging timeout."""
        for name in ("scheduled_grads", "scheduled_state"):
            control = getattr(self, name)
            if control is None or control.done():
                continue
            if control.stage == AveragingStage.IDLE:
                control.cancel()
            else:
                self._tag_along_with_zero_weight(control)
            setattr(self, name, None)

    def load_state_from_peers(self, **kwargs):
        self.reload_delay = min(2 * self.reload_delay, MAX_RELOAD_DELAY)  # 2, 4, 8... s to the next one
        self.reloads += 1
        try:
            super().load_state_from_peers(**kwargs)
        finally:  # counted from the end: a download slower than the delay must not start the next one at once
            self.last_reload = time.monotonic()
        self.needs_reload = self.local_epoch < self.tracker.global_epoch
        if not self.needs_reload:
            self._advertise()

    @property
    def in_sync(self) -> bool:
        return not self.needs_reload and self.state_averager.allow_state_sharing \
            and self.local_epoch >= self.tracker.global_epoch

    def _advertise(self) -> None:
        self.state_averager.allow_state_sharing = True
        self.state_averager.state_sharing_priority = self.local_epoch + PRIORITY_BONUS
        if self.grad_averager is not None:
            self.grad_averager.state_sharing_priority = self.local_epoch + PRIORITY_BONUS


def recipe_mismatch(ours, swarm) -> Optional[str]:
    """Why a replica with ModelInfo `ours` must not follow a swarm whose most common ModelInfo is `swarm` (None: ok)."""
    if ours.recipe_hash == swarm.recipe_hash:
        return None
    named = {"model": "name", "depth": "depth", "num-classes": "num_classes", "image-size": "image_size",
             "compression/rank": "compression", "ema": "ema"}
    diffs = [f"--{flag} {getattr(ours, field)!r} here, {getattr(swarm, field)!r} in the swarm"
             for flag, field in named.items() if getattr(ours, field) != getattr(swarm, field)]
    detail = "; ".join(diffs) if diffs else (
        "a setting the peers do not publish differs: --lr, --warmup-steps, --weight-decay, the other recipe flags, "
        "--target-batch-size, --average-state-every or --optimizer")
    return (f"this replica's recipe differs from the swarm's ({detail}); recipe hash {ours.recipe_hash} here, "
            f"{swarm.recipe_hash} in the swarm. A replica must be started with the training peers' exact flags; "
            "it would apply steps the swarm does not take and serve a wrong state")


class ReplicaPeer(Peer):
    """A Peer without data: the same DHT, seeded model and optimizer construction, a ReplicaOptimizer."""

    needs_data = False

    def __init__(self, config: PeerConfig, stop: threading.Event, recipe_wait: Optional[float] = None):
        self.stop, self.recipe_wait = stop, recipe_wait
        self._state_bytes = 0
        super().__init__(config)

    def make_optimizer(self, kwargs: dict) -> ReplicaOptimizer:
        self.check_recipe()
        kwargs["reuse_grad_buffers"] = False  # no local gradients, no GradScaler
        return ReplicaOptimizer(**kwargs)

    def check_recipe(self) -> None:
        """Wait for the training peers' ModelInfo; refuse (ValueError) when the common recipe hash is not ours."""
        announced, started = -float("inf"), time.monotonic()
        while True:
            models = self.records.models()
            hashes = Counter(m.recipe_hash for m in models)
            known = {h: n for h, n in hashes.items() if h is not None}
            if known:
                common = max(known, key=known.get)
                swarm = next(m for m in models if m.recipe_hash == common)
                problem = recipe_mismatch(self.model_info, swarm)
                if problem is not None:
                    logger.error(problem)
                    raise ValueError(problem)
                logger.info(f"the swarm's recipe hash is {common}, the same as ours ({known[common]} peer(s))")
                return
            if hashes:
                raise ValueError("the swarm's peers publish no recipe hash (an older ConvForever?): a replica cannot "
                                 "check that it follows their recipe")
            if self.recipe_wait is not None and time.monotonic() - started > self.recipe_wait:
                raise ValueError(f"no training peer announced its recipe within {self.recipe_wait:.0f}s")
            if time.monotonic() - announced > 10:
                print("replica waiting for a training peer to announce the swarm's recipe", flush=True)
                announced = time.monotonic()
            if self.stop.wait(0.5):
                raise ReplicaStopped()

    def served_states(self) -> int:
        """About how many full states joiners (or the coordinator) downloaded from us."""
        if not self._state_bytes:
            _, tensors, _ = self.opt.state_averager.get_current_state()
            self._state_bytes = sum(t.numel() * t.element_size() for t in tensors) or 1
        return round(self.counters.snapshot().state_download_bytes_sent / self._state_bytes)

    def report(self, final: bool = False) -> None:
        opt = self.opt
        state = "in sync" if opt.in_sync else f"out of sync (swarm at {opt.tracker.global_epoch})"
        print(f"replica step {opt.local_epoch} | {state} | "
              f"served {self.served_states()} states | reloads {opt.reloads} | missed rounds {opt.missed_rounds} | "
              f"group {opt.last_group_size}", flush=True)

    def run(self, stop: threading.Event) -> None:
        opt = self.opt
        opt.load_state_from_peers()  # the swarm may be ahead; at step 0 this is the same seeded state
        # count (and space out) only the reloads after missed rounds
        opt.reloads, opt.last_reload, opt.reload_delay = 0, -float("inf"), FIRST_RELOAD_DELAY
        logger.info(f"replica following run {self.config.run_id!r} from global step {opt.local_epoch} "
                    f"(the swarm is at {opt.tracker.global_epoch})")
        last_report = time.monotonic()
        while not stop.is_set() and not self.finished():
            opt.step()
            if self.ema is not None:
                self.ema.on_global_step(self.model, opt.local_epoch)
            if time.monotonic() - last_report >= self.config.report_every:
                self.report()
                last_report = time.monotonic()
            stop.wait(STEP_EVERY)
        self.report(final=True)
        sizes = dict(sorted(opt.group_sizes.items()))
        logger.info(f"replica leaving at global step {opt.local_epoch}; "
                    f"all-reduce group sizes: {sizes}")
        if self.finished():
            self.wait_for_checkpoint(stop)  # keep serving until the coordinator has our final step


def run_replica(config: PeerConfig, stop: threading.Event) -> None:
    """`convforever-peer --role replica`: follow the swarm and serve its state until stopped (or --max-steps)."""
    try:
        replica = ReplicaPeer(config, stop)
    except ReplicaStopped:
        return
    try:
        logger.info("other peers can also join through: " + " ".join(replica.visible_maddrs))
        replica.run(stop)
    finally:
        replica.close()
