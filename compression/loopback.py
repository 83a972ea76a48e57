"""Real peers on 127.0.0.1 averaging gradients in every mode: the measurement behind the tests and the bench.

Each peer is its own spawned process with its own DHT (hivemind uses signals and forks per process, so peers must
not share one); peers 1..n-1 bootstrap from peer 0 and every round waits for a group of all n. Gradients come from
``grads_fn(peer, round)``, a picklable function that every peer can evaluate, so each peer computes the exact mean
itself and reports the averaging error.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .config import CompressionConfig
from .counters import TrafficCounters, TrafficSnapshot
from .factory import build_averaging_kwargs

logger = logging.getLogger(__name__)

GradsFn = Callable[[int, int], Sequence[torch.Tensor]]
STATE_MODE = "state"  # pseudo-mode: one state-averaging round of the parameters with the state codec


@dataclass
class GroupSpec:
    """One loopback experiment: which modes, on which tensors, for how many rounds, in a group of how many peers.

    :param modes: mode names (or ``STATE_MODE``), each run with ``rank``, ``layout`` and ``state_compression``; the
      result's label is the mode name.
    :param warmup_steps: PowerSGD's warm-up for ``modes`` (round ``i`` is epoch ``i``); 0, unlike the peer's
      default, so that ``modes`` measure PowerSGD rounds.
    :param variants: further ``(label, config)`` runs, for settings ``modes`` cannot say (other ranks, layouts).
    :param peers: group size; every round waits until all of them have joined.
    :param min_matchmaking_time: seconds each round waits to form a group; below ~0.5 s on a loaded 2-core box the
      peers may miss each other and retry (use more for 4 peers).
    :param close_each_run: shut each run's averager down once every peer is done with it. Costs a few seconds per
      run (see ``_peer_main``) but frees its buffers (~0.5 GB per ConvNeXt-T run and peer), so many runs fit in one
      set of peer processes.
    """

    modes: Sequence[str]
    shapes: Sequence[tuple[int, ...]]
    grads_fn: GradsFn
    rounds: int = 2
    rank: int = 4
    layout: str = CompressionConfig().layout
    state_compression: str = "fp16"
    warmup_steps: int = 0  # for ``modes``: PowerSGD from the first round (each round counts as an epoch)
    peers: int = 2
    variants: Sequence[tuple[str, CompressionConfig]] = ()
    min_matchmaking_time: float = 1.0
    step_timeout: float = 60.0
    run_id: str = "loopback"
    log_level: int = logging.WARNING
    close_each_run: bool = False

    def runs(self) -> list[tuple[str, Optional[CompressionConfig]]]:
        """Every (label, config) in order; the state pseudo-mode has no config of its own."""
        runs: list[tuple[str, Optional[CompressionConfig]]] = [
            (mode, None if mode == STATE_MODE else
             CompressionConfig(mode=mode, rank=self.rank, layout=self.layout, state_compression=self.state_compression,
                               warmup_steps=self.warmup_steps))
            for mode in self.modes
        ]
        runs.extend(self.variants)
        labels = [label for label, _ in runs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"loopback run labels must be unique, got {labels}")
        return runs


PairSpec = GroupSpec  # the name from when every experiment was a pair; its default of two peers is unchanged


@dataclass
class ModeResult:
    """What one peer measured for one mode (``mode`` is the run's label).

    ``max_abs_error`` and ``rel_l2_error`` compare the last round's averaged gradient with the exact mean of all
    peers. Under PowerSGD that is not its quality measure: error feedback re-sends what a round missed, so
    ``extra["cumulative_rel_l2"]`` compares the sums over all rounds, which is what the optimizer integrates.
    """

    mode: str
    peer: int
    snapshot: TrafficSnapshot
    max_abs_error: float = math.nan
    rel_l2_error: float = math.nan
    extra: dict = field(default_factory=dict)


def _per_tensor_errors(averaged: Sequence[torch.Tensor], exact: Sequence[torch.Tensor]) -> list[float]:
    return [float((a - e).norm() / e.norm().clamp_min(1e-30)) for a, e in zip(averaged, exact, strict=True)]


def _errors(averaged: Sequence[torch.Tensor], exact: Sequence[torch.Tensor]) -> tuple[float, float]:
    max_abs = max(float((a - e).abs().max()) for a, e in zip(averaged, exact, strict=True))
    diff = math.sqrt(sum(float((a - e).pow(2).sum()) for a, e in zip(averaged, exact, strict=True)))
    norm = math.sqrt(sum(float(e.pow(2).sum()) for e in exact))
    return max_abs, diff / max(norm, 1e-30)


def _exact_mean(spec: GroupSpec, round_index: int) -> list[torch.Tensor]:
    """The exact mean over all peers of one round's gradients.

    Recomputed on every call rather than kept: a ConvNeXt-T mean is 114 MB, and 4 peers each holding one per round
    do not fit a small box next to the averagers' buffers.
    """
    total = [g.clone() for g in spec.grads_fn(0, round_index)]
    for peer in range(1, spec.peers):
        for acc, grad in zip(total, spec.grads_fn(peer, round_index), strict=True):
            acc.add_(grad)
    return [acc.div_(spec.peers) for acc in total]


def _group_kwargs(spec: GroupSpec) -> dict:
    return dict(start=True, target_group_size=spec.peers, min_group_size=spec.peers,
                min_matchmaking_time=spec.min_matchmaking_time, request_timeout=spec.min_matchmaking_time / 2)


def _run_grad_mode(spec: GroupSpec, peer: int, label: str, config: CompressionConfig, prefix: str, dht, barrier,
                   opened: list) -> ModeResult:
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in spec.shapes]
    counters = TrafficCounters()  # before the averager forks
    kwargs = build_averaging_kwargs(config, counters, params)
    averager = kwargs["grad_averager_factory"](
        parameters=params, dht=dht, prefix=prefix, compression=kwargs["grad_compression"], **_group_kwargs(spec)
    )
    opened.append(averager)
    errors, per_tensor, round_errors, round_bytes = (math.nan, math.nan), [], [], []
    sum_averaged = [torch.zeros(shape) for shape in spec.shapes]
    sum_exact = [torch.zeros(shape) for shape in spec.shapes]
    current_round = 0
    if hasattr(averager, "epoch_source"):  # PowerSGD's warm-up decides by epoch: here the round is the epoch
        averager.epoch_source = lambda: current_round
    for round_index in range(spec.rounds):
        current_round = round_index
        sent_before = counters.snapshot().grad_bytes_sent
        for param, grad in zip(params, spec.grads_fn(peer, round_index), strict=True):
            param.grad = grad.clone()
        averager.accumulate_grads_(batch_size=1)
        for param in params:
            param.grad = None  # the averager holds its own copy
        barrier.wait()
        logger.debug("peer %d: %s round %d stepping", peer, label, round_index)
        averager.step(timeout=spec.step_timeout)
        exact = _exact_mean(spec, round_index)
        with averager.use_averaged_gradients() as averaged:
            errors, per_tensor = _errors(averaged, exact), _per_tensor_errors(averaged, exact)
            round_errors.append(errors[1])
            for total, value in zip(sum_averaged, averaged, strict=True):
                total.add_(value)
        for total, value in zip(sum_exact, exact, strict=True):
            total.add_(value)
        round_bytes.append(counters.snapshot().grad_bytes_sent - sent_before)
    cumulative = _errors(sum_averaged, sum_exact)[1]
    extra = dict(
        per_tensor_rel_l2=per_tensor, cumulative_rel_l2=cumulative, round_rel_l2=round_errors,
        round_bytes_sent=round_bytes,
        # squared error and squared norm of each tensor's sum over rounds: the rel L2 of any subset of tensors
        cumulative_err_sq=[float((a - e).pow(2).sum()) for a, e in zip(sum_averaged, sum_exact, strict=True)],
        cumulative_ref_sq=[float(e.pow(2).sum()) for e in sum_exact],
    )
    return ModeResult(label, peer, counters.snapshot(), *errors, extra=extra)


def _run_state_round(spec: GroupSpec, peer: int, prefix: str, dht, barrier, opened: list) -> ModeResult:
    """One all-reduce of the parameters through the state codec, as TrainingStateAverager would run it."""
    from hivemind.averaging import DecentralizedAverager

    config = CompressionConfig(state_compression=spec.state_compression)
    values = [g.clone() for g in spec.grads_fn(peer, 0)]
    counters = TrafficCounters()
    kwargs = build_averaging_kwargs(config, counters, values)
    averager = DecentralizedAverager(
        values, dht, prefix=prefix, compression=kwargs["state_averaging_compression"], **_group_kwargs(spec)
    )
    opened.append(averager)
    barrier.wait()
    averager.step(timeout=spec.step_timeout)
    with averager.get_tensors() as averaged:
        errors = _errors(averaged, _exact_mean(spec, 0))
    return ModeResult(STATE_MODE, peer, counters.snapshot(), *errors)


def _peer_main(spec: GroupSpec, peer: int, maddrs: mp.Queue, results: mp.Queue, barrier) -> None:
    import hivemind

    # a spawned child inherits "spawn" as its default start method; hivemind's DHT and averagers must fork (their
    # state, shared tensors and counters included, is not picklable)
    mp.set_start_method("fork", force=True)
    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(process)d %(name)s %(message)s")
    logging.getLogger("hivemind").setLevel(max(spec.log_level, logging.WARNING))
    torch.set_num_threads(1)  # the peers share the box; oversubscription makes matchmaking miss its window
    if peer == 0:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        visible = [str(addr) for addr in dht.get_visible_maddrs()]
        for _ in range(spec.peers - 1):
            maddrs.put(visible)
    else:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs.get(timeout=60))
    # Averagers stay open until every mode is done: shutting one down while the DHT still holds its pending requests
    # stalls that DHT for seconds per averager. At exit, daemonic averager and DHT processes are terminated.
    opened: list = []
    try:
        for index, (label, config) in enumerate(spec.runs()):
            prefix = f"{spec.run_id}_{index}"
            if config is None:
                result = _run_state_round(spec, peer, prefix, dht, barrier, opened)
            else:
                result = _run_grad_mode(spec, peer, label, config, prefix, dht, barrier, opened)
            results.put(result)
            if spec.close_each_run:
                barrier.wait()  # nobody is still averaging with it
                opened.pop().shutdown()
        barrier.wait()  # the others may still be inside their last all-reduce with us
    except BaseException:
        barrier.abort()  # release the other peers instead of letting them wait out their timeout
        raise


def run_group(spec: GroupSpec, timeout: float = 300.0,
              on_result: Optional[Callable[[ModeResult], None]] = None) -> list[ModeResult]:
    """Run all ``spec.peers`` peers to completion; return every (run, peer) result sorted by run, then peer.

    ``on_result`` sees each result as it arrives (progress for long runs). Raises if a peer fails or times out.
    """
    labels = [label for label, _ in spec.runs()]
    context = mp.get_context("spawn")
    maddrs, results = context.Queue(), context.Queue()
    barrier = context.Barrier(spec.peers, timeout=timeout)
    peers = [context.Process(target=_peer_main, args=(spec, i, maddrs, results, barrier), daemon=False)
             for i in range(spec.peers)]
    for process in peers:
        process.start()
    collected: list[ModeResult] = []
    expected = spec.peers * len(labels)
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < expected:
            try:
                collected.append(results.get(timeout=1.0))
                if on_result is not None:
                    on_result(collected[-1])
                continue
            except queue.Empty:
                pass
            codes = [p.exitcode for p in peers]
            if any(code not in (None, 0) for code in codes):
                raise RuntimeError(f"a loopback peer failed (exit codes {codes}); its traceback is in stderr")
            if time.monotonic() > deadline:
                raise TimeoutError(f"loopback peers produced {len(collected)}/{expected} results in {timeout:.0f}s")
        return sorted(collected, key=lambda r: (labels.index(r.mode), r.peer))
    finally:
        for process in peers:
            process.join(timeout=15)
            if process.is_alive():
                logger.warning("loopback peer %s did not exit; terminating it", process.pid)
                process.terminate()


def run_pair(spec: GroupSpec, timeout: float = 300.0) -> list[ModeResult]:
    """``run_group`` for callers that predate group sizes; ``spec.peers`` decides (two by default)."""
    return run_group(spec, timeout)
