"""Two real peers on 127.0.0.1 averaging gradients in every mode: the measurement behind the tests and the bench.

Each peer is its own spawned process with its own DHT (hivemind uses signals and forks per process, so peers must
not share one); peer 1 bootstraps from peer 0. Gradients come from ``grads_fn(peer, round)``, a picklable function
that both peers can evaluate, so each peer computes the exact mean itself and reports the averaging error.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .config import CompressionConfig
from .counters import TrafficCounters, TrafficSnapshot
from .factory import build_averaging_kwargs

logger = logging.getLogger(__name__)

GradsFn = Callable[[int, int], Sequence[torch.Tensor]]
STATE_MODE = "state"  # pseudo-mode: one state-averaging round of the parameters with the state codec


@dataclass
class PairSpec:
    """One loopback experiment: which modes, on which tensors, for how many rounds.

    :param min_matchmaking_time: seconds each round waits to form a group; below ~0.5 s on a loaded 2-core box the
      peers may miss each other and retry.
    """

    modes: Sequence[str]
    shapes: Sequence[tuple[int, ...]]
    grads_fn: GradsFn
    rounds: int = 2
    rank: int = 4
    state_compression: str = "fp16"
    min_matchmaking_time: float = 1.0
    step_timeout: float = 60.0
    run_id: str = "loopback"
    log_level: int = logging.WARNING


@dataclass
class ModeResult:
    """What one peer measured for one mode.

    ``max_abs_error`` and ``rel_l2_error`` compare the last round's averaged gradient with the exact mean of both
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
    return [float((a - e).norm() / e.norm().clamp_min(1e-30)) for a, e in zip(averaged, exact)]


def _errors(averaged: Sequence[torch.Tensor], exact: Sequence[torch.Tensor]) -> tuple[float, float]:
    max_abs = max(float((a - e).abs().max()) for a, e in zip(averaged, exact))
    diff = math.sqrt(sum(float((a - e).pow(2).sum()) for a, e in zip(averaged, exact)))
    norm = math.sqrt(sum(float(e.pow(2).sum()) for e in exact))
    return max_abs, diff / max(norm, 1e-30)


def _run_grad_mode(spec: PairSpec, peer: int, mode: str, dht, barrier, opened: list) -> ModeResult:
    config = CompressionConfig(mode=mode, rank=spec.rank, state_compression=spec.state_compression)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in spec.shapes]
    counters = TrafficCounters()  # before the averager forks
    kwargs = build_averaging_kwargs(config, counters, params)
    averager = kwargs["grad_averager_factory"](
        parameters=params, dht=dht, prefix=f"{spec.run_id}_{mode.replace('-', '_')}",
        compression=kwargs["grad_compression"], start=True, target_group_size=2, min_group_size=2,
        min_matchmaking_time=spec.min_matchmaking_time, request_timeout=spec.min_matchmaking_time / 2,
    )
    opened.append(averager)
    errors, per_tensor = (math.nan, math.nan), []
    sum_averaged = [torch.zeros(shape) for shape in spec.shapes]
    sum_exact = [torch.zeros(shape) for shape in spec.shapes]
    for round_index in range(spec.rounds):
        for param, grad in zip(params, spec.grads_fn(peer, round_index)):
            param.grad = grad.clone()
        averager.accumulate_grads_(batch_size=1)
        barrier.wait()
        logger.debug("peer %d: %s round %d stepping", peer, mode, round_index)
        averager.step(timeout=spec.step_timeout)
        exact = [(a + b) / 2 for a, b in zip(spec.grads_fn(0, round_index), spec.grads_fn(1, round_index))]
        with averager.use_averaged_gradients() as averaged:
            errors, per_tensor = _errors(averaged, exact), _per_tensor_errors(averaged, exact)
            for total, value in zip(sum_averaged, averaged):
                total.add_(value)
        for total, value in zip(sum_exact, exact):
            total.add_(value)
    cumulative = _errors(sum_averaged, sum_exact)[1]
    extra = dict(per_tensor_rel_l2=per_tensor, cumulative_rel_l2=cumulative)
    return ModeResult(mode, peer, counters.snapshot(), *errors, extra=extra)


def _run_state_round(spec: PairSpec, peer: int, dht, barrier, opened: list) -> ModeResult:
    """One all-reduce of the parameters through the state codec, as TrainingStateAverager would run it."""
    from hivemind.averaging import DecentralizedAverager

    config = CompressionConfig(state_compression=spec.state_compression)
    values = [g.clone() for g in spec.grads_fn(peer, 0)]
    counters = TrafficCounters()
    kwargs = build_averaging_kwargs(config, counters, values)
    averager = DecentralizedAverager(
        values, dht, prefix=f"{spec.run_id}_state", compression=kwargs["state_averaging_compression"], start=True,
        target_group_size=2, min_group_size=2, min_matchmaking_time=spec.min_matchmaking_time,
        request_timeout=spec.min_matchmaking_time / 2,
    )
    opened.append(averager)
    barrier.wait()
    averager.step(timeout=spec.step_timeout)
    exact = [(a + b) / 2 for a, b in zip(spec.grads_fn(0, 0), spec.grads_fn(1, 0))]
    with averager.get_tensors() as averaged:
        errors = _errors(averaged, exact)
    return ModeResult(STATE_MODE, peer, counters.snapshot(), *errors)


def _peer_main(spec: PairSpec, peer: int, maddrs: mp.Queue, results: mp.Queue, barrier) -> None:
    import hivemind

    # a spawned child inherits "spawn" as its default start method; hivemind's DHT and averagers must fork (their
    # state, shared tensors and counters included, is not picklable)
    mp.set_start_method("fork", force=True)
    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(process)d %(name)s %(message)s")
    logging.getLogger("hivemind").setLevel(max(spec.log_level, logging.WARNING))
    torch.set_num_threads(1)  # two peers share the box; oversubscription makes matchmaking miss its window
    if peer == 0:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        maddrs.put([str(addr) for addr in dht.get_visible_maddrs()])
    else:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs.get(timeout=60))
    # Averagers stay open until every mode is done: shutting one down while the DHT still holds its pending requests
    # stalls that DHT for seconds per averager. At exit, daemonic averager and DHT processes are terminated.
    opened: list = []
    try:
        for mode in spec.modes:
            if mode == STATE_MODE:
                result = _run_state_round(spec, peer, dht, barrier, opened)
            else:
                result = _run_grad_mode(spec, peer, mode, dht, barrier, opened)
            results.put(result)
        barrier.wait()  # the other peer may still be inside its last all-reduce with us
    except BaseException:
        barrier.abort()  # release the other peer instead of letting it wait out its timeout
        raise


def run_pair(spec: PairSpec, timeout: float = 300.0) -> list[ModeResult]:
    """Run both peers to completion; return every (mode, peer) result. Raises if a peer fails or times out."""
    context = mp.get_context("spawn")
    maddrs, results, barrier = context.Queue(), context.Queue(), context.Barrier(2, timeout=timeout)
    peers = [context.Process(target=_peer_main, args=(spec, i, maddrs, results, barrier), daemon=False)
             for i in range(2)]
    for process in peers:
        process.start()
    collected: list[ModeResult] = []
    expected = 2 * len(spec.modes)
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < expected:
            try:
                collected.append(results.get(timeout=1.0))
                continue
            except queue.Empty:
                pass
            codes = [p.exitcode for p in peers]
            if any(code not in (None, 0) for code in codes):
                raise RuntimeError(f"a loopback peer failed (exit codes {codes}); its traceback is in stderr")
            if time.monotonic() > deadline:
                raise TimeoutError(f"loopback peers produced {len(collected)}/{expected} results in {timeout:.0f}s")
        return sorted(collected, key=lambda r: (list(spec.modes).index(r.mode), r.peer))
    finally:
        for process in peers:
            process.join(timeout=15)
            if process.is_alive():
                logger.warning("loopback peer %s did not exit; terminating it", process.pid)
                process.terminate()
