"""The processes a ``netns.Lab`` runs inside its namespaces: a DHT bootstrap node, a gradient-averaging peer for
tests/test_netns.py, a hivemind.Optimizer peer for bench/home_links.py, and ConvForever's own optimizers (a
training peer, a joiner, a state replica) for bench/join_slowdown.py.

Run as ``python bench/netns_peer.py ROLE 'JSON config'`` under ``ip netns exec`` (Python 3.11 has no os.setns, and
hivemind allows one peer per process). Each talks to the parent with ``netns.emit`` (JSON lines on stdout) and
takes commands from stdin (``netns.commands``); it exits when the parent closes stdin.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import commands, emit  # noqa: E402


@dataclass
class NodeAddress:
    """Where a node's p2p daemon listens and what it tells others to dial (the latency relay, if any)."""

    listen: str
    announce: str
    initial_peers: list[str] = field(default_factory=list)


@dataclass
class RoundsConfig:
    """A pair of peers running explicit gradient all-reduces, one per ``{"cmd": "round"}`` from the parent."""

    address: NodeAddress
    peer: int
    shapes: list[list[int]]
    mode: str = "none"
    num_peers: int = 2
    run_id: str = "netns"
    min_matchmaking_time: float = 1.0
    step_timeout: float = 60.0


@dataclass
class OptimizerConfig:
    """One bench peer: ConvNeXt-T-shaped parameters under hivemind.Optimizer, compute emulated by a sleep."""

    address: NodeAddress
    peer: int
    steps: int
    compute_s: float
    batch_per_step: int
    target_batch_size: int
    mode: str = "powersgd-8bit"
    rank: int = 4
    run_id: str = "homelinks"
    model: str = "convnext_tiny"
    matchmaking_time: float = 5.0
    averaging_timeout: float = 30.0
    next_chunk_timeout: Optional[float] = None  # hivemind's default: matchmaking_time
    average_state_every: int = 1000
    delay_grad_averaging: bool = True
    delay_optimizer_step: bool = True
    request_timeout: float = 3.0
    report_every_s: float = 10.0
    # True: how a GPU peer runs hivemind's delayed parameter updates, reuse_grad_buffers (the backward accumulates
    # into .grad, hivemind adds nothing per step) with offload_optimizer (the optimizer and the averaged gradients
    # live in their own copy, so a delayed step never writes into .grad while the next batch accumulates).
    # False: hivemind's defaults, which add every step's .grad into its accumulators, a 28.6M-value add per step
    # that this CPU needs ~30 ms for and a GPU well under one.
    gpu_like: bool = True
    progress_interval: Optional[float] = None  # seconds between progress records in an epoch (None: the peer's)


@dataclass
class SwarmPeerConfig(OptimizerConfig):
    """A bench/join_slowdown.py peer: ConvForever's SwarmOptimizer (or ReplicaOptimizer) with AdamW, so the state a
    joiner downloads has its real size (parameters + two statistics, fp32). ``kind``: ``train`` computes from
    ``go`` until ``stop``; ``joiner`` waits for ``join``, downloads the state, then trains; ``replica`` follows every
    step with weight 0 and serves the state (peer/replica.py)."""

    kind: str = "train"  # (``steps`` is unused: every kind runs until "stop")


def _setup(address: NodeAddress):
    import hivemind
    import torch

    # First in line for the OOM killer (forked averagers inherit it): on a shared machine a bench that runs out of
    # memory should lose its own peers, not someone else's job.
    try:
        with open("/proc/self/oom_score_adj", "w", encoding="utf-8") as f:
            f.write("1000")
    except OSError:
        pass

    # hivemind's averagers must fork (their shared tensors and counters are not picklable)
    mp.set_start_method("fork", force=True)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)  # several peers share two cores
    return hivemind.DHT(start=True, host_maddrs=[address.listen], announce_maddrs=[address.announce],
                        initial_peers=address.initial_peers)


def run_dht(address: NodeAddress) -> None:
    """The coordinator's part in the swarm's network: a DHT bootstrap node every peer dials first."""
    dht = _setup(address)
    emit(event="ready", maddrs=[str(a) for a in dht.get_visible_maddrs()])
    for _ in commands():
        pass
    dht.shutdown()


def run_rounds(config: RoundsConfig) -> None:
    import torch

    from convforever.compression import CompressionConfig, TrafficCounters, build_averaging_kwargs

    dht = _setup(config.address)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in config.shapes]
    counters = TrafficCounters()  # before the averager forks
    kwargs = build_averaging_kwargs(CompressionConfig(mode=config.mode), counters, params)
    averager = kwargs["grad_averager_factory"](
        parameters=params, dht=dht, prefix=f"{config.run_id}_grads", compression=kwargs["grad_compression"],
        start=True, target_group_size=2, min_group_size=2, min_matchmaking_time=config.min_matchmaking_time,
        request_timeout=config.min_matchmaking_time / 2,
    )
    emit(event="ready", maddrs=[str(a) for a in dht.get_visible_maddrs()])
    for index, command in enumerate(commands()):
        if command.get("cmd") != "round":
            continue
        grads = _round_grads(config.shapes, config.peer, index)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        averager.accumulate_grads_(batch_size=1)
        try:
            group = averager.step(timeout=config.step_timeout)
            ok, error = True, ""
        except Exception as e:  # a failed round is a result to report, not a crash
            group, ok, error = None, False, repr(e)
        peers = range(config.num_peers)
        exact = [sum(tensors) / config.num_peers for tensors in zip(*(_round_grads(config.shapes, p, index)
                                                                       for p in peers), strict=True)]
        with averager.use_averaged_gradients() as averaged:
            error_max = max(float((a - e).abs().max()) for a, e in zip(averaged, exact, strict=True))
        averager.reset_accumulated_grads_()
        emit(event="round", ok=ok, error=error, group_size=len(group) if group else 0, max_abs_error=error_max,
             traffic=asdict(counters.snapshot()))
    averager.shutdown()  # orderly, so that torch unlinks the shared tensors' files in /dev/shm
    dht.shutdown()


def start_rounds_peers(lab, nodes, ready_timeout: float = 180.0, **config) -> list:
    """Parent side: a ``rounds`` peer in each node (``config``: RoundsConfig fields but address and peer), each
    bootstrapping from the one before; returns the children once every one is ready."""
    peers, maddrs = [], []
    for index, node in enumerate(nodes):
        address = dict(listen=node.listen_maddr, announce=node.announce_maddr, initial_peers=maddrs)
        peers.append(lab.spawn(node, [sys.executable, str(Path(__file__)), "rounds",
                                      json.dumps(dict(address=address, peer=index, **config))]))
        maddrs = peers[-1].expect("ready", timeout=ready_timeout)["maddrs"]
    return peers


def drive_rounds(peers: list, rounds: int, timeout: float, on_round=None) -> list[list[dict]]:
    """Parent side: ``rounds`` all-reduces of every peer together; each peer's ``round`` events, in order."""
    results: list[list[dict]] = [[] for _ in peers]
    for index in range(rounds):
        for peer in peers:
            peer.send({"cmd": "round"})
        for peer, got in zip(peers, results, strict=True):
            got.append(peer.expect("round", timeout=timeout))
        if on_round is not None:
            on_round(index, results)
    return results


def _round_grads(shapes: list[list[int]], peer: int, index: int) -> list:
    """Peer ``peer``'s gradients in round ``index``: seeded, so every peer can compute the exact mean itself."""
    import torch

    generator = torch.Generator().manual_seed(1000 * peer + index)
    return [torch.randn(shape, generator=generator) for shape in shapes]


@dataclass
class _Clock:
    """Where a peer's wall time went: emulated compute (the sleep) against everything else (mostly opt.step)."""

    compute: float = 0.0
    steps: list[float] = field(default_factory=list)

    def add_step(self, seconds: float) -> None:
        self.steps.append(seconds)

    def summary(self) -> dict:
        """Total, longest and median opt.step(): the median is the per-step bookkeeping (gradient accumulation,
        progress report), the longest the worst wait at an epoch boundary."""
        ordered = sorted(self.steps) or [math.nan]
        return dict(compute=self.compute, step_time=sum(self.steps), longest_step=ordered[-1],
                    median_step=ordered[len(ordered) // 2])


def _counting_optimizer_class():
    """hivemind.Optimizer that counts, per epoch, the size of the group its gradients were averaged in.

    ``_average_gradients_and_load_into_optimizer`` runs once per epoch (in the background under
    delay_grad_averaging); its step control holds the group when the all-reduce succeeded. 1 = averaged alone:
    matchmaking found nobody or the round failed, and the peer stepped with its local gradients.
    """
    from collections import Counter

    import hivemind

    from convforever.peer.progress import PlausibleProgressTracker

    class GroupCountingOptimizer(hivemind.Optimizer):
        def __init__(self, progress_interval: Optional[float], **kwargs) -> None:
            self.group_sizes: Counter = Counter()
            self.progress_interval = progress_interval
            super().__init__(**kwargs)

        def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> PlausibleProgressTracker:
            # the tracker a ConvForever peer runs (peer/trainer.py), with the bench's report interval
            if self.progress_interval is not None:
                kwargs["report_interval"] = self.progress_interval
            return PlausibleProgressTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                            client_mode=self.client_mode, status_loglevel=self.status_loglevel,
                                            start=True, **kwargs)

        def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
            super()._average_gradients_and_load_into_optimizer(maybe_step_control)
            control = maybe_step_control
            ok = control is not None and control.done() and not control.cancelled() and control.exception() is None
            self.group_sizes[len(control.result()) if ok else 1] += 1

    return GroupCountingOptimizer


def run_optimizer(config: OptimizerConfig) -> None:
    import torch

    from convforever.compression import CompressionConfig, TrafficCounters, build_averaging_kwargs
    from convforever.model import ModelConfig, create_model

    dht = _setup(config.address)
    model = create_model(ModelConfig(name=config.model, num_classes=1000))
    params = list(model.parameters())
    counters = TrafficCounters()
    averaging = build_averaging_kwargs(CompressionConfig(mode=config.mode, rank=config.rank), counters, params)
    factory = averaging.pop("grad_averager_factory")
    opt = _counting_optimizer_class()(
        progress_interval=config.progress_interval, dht=dht, run_id=config.run_id, params=params,
        # plain SGD: the optimizer's arithmetic is not what we measure, and AdamW's ~10 passes over 28.6M values cost
        # this shared 2-core CPU what a GPU does in a millisecond
        optimizer=lambda p: torch.optim.SGD(p, lr=1e-4),
        batch_size_per_step=config.batch_per_step, target_batch_size=config.target_batch_size,
        matchmaking_time=config.matchmaking_time, averaging_timeout=config.averaging_timeout,
        next_chunk_timeout=config.next_chunk_timeout, average_state_every=config.average_state_every,
        delay_grad_averaging=config.delay_grad_averaging, delay_optimizer_step=config.delay_optimizer_step,
        grad_averager_factory=lambda **kw: factory(request_timeout=config.request_timeout, **kw),
        averager_opts=dict(request_timeout=config.request_timeout), tracker_opts=dict(default_refresh_period=1.0),
        reuse_grad_buffers=config.gpu_like, offload_optimizer=config.gpu_like, verbose=False, **averaging,
    )
    # The fake backward: fixed per-peer gradients (a GPU writes them inside the compute we emulate).
    generator = torch.Generator().manual_seed(config.peer)
    grads = [torch.randn(p.shape, generator=generator).mul_(1e-3) for p in params]
    if config.gpu_like:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
    emit(event="ready", maddrs=[str(a) for a in dht.get_visible_maddrs()], params=sum(p.numel() for p in params))
    for command in commands():
        if command.get("cmd") == "go":
            break
    else:
        return
    clock, start, last_report = _Clock(), time.monotonic(), time.monotonic()
    before = counters.snapshot()
    epoch = opt.local_epoch
    for step in range(config.steps):
        if not config.gpu_like:
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad  # hivemind adds .grad into its own accumulators and never writes into it
        began = time.monotonic()
        time.sleep(config.compute_s)  # the forward/backward a GPU would be running
        stepped = time.monotonic()
        clock.compute += stepped - began
        opt.step()
        if config.gpu_like and opt.local_epoch != epoch:
            # hivemind zeroed the .grad buffers (its accumulators) for the new epoch: the next backward refills
            # them. Done once per epoch on this CPU and counted as not computing.
            epoch = opt.local_epoch
            with torch.no_grad():
                for param, grad in zip(params, grads, strict=True):
                    param.grad.copy_(grad)
        clock.add_step(time.monotonic() - stepped)
        if time.monotonic() - last_report >= config.report_every_s or step == config.steps - 1:
            last_report = time.monotonic()
            wall = last_report - start
            emit(event="progress", step=step + 1, epoch=opt.local_epoch, wall=wall,
                 compute_fraction=clock.compute / wall, group_sizes=dict(opt.group_sizes))
    wall = time.monotonic() - start
    traffic = counters.snapshot() - before
    emit(event="done", wall=wall, **clock.summary(), compute_fraction=clock.compute / wall if wall else math.nan,
         epoch=opt.local_epoch, group_sizes={str(k): v for k, v in opt.group_sizes.items()}, traffic=asdict(traffic))
    for command in commands():  # stay in the swarm (others may still be averaging with us) until stdin closes
        if command.get("cmd") == "final":  # every peer is done: the traffic up to now, against the interfaces'
            emit(event="final", traffic=asdict(counters.snapshot() - before))
    # An orderly shutdown: averagers, tracker and DHT stop their processes, and torch's shared-memory manager
    # then unlinks the tensors' files in /dev/shm (hivemind shares them through the file system: a peer killed
    # before this leaks ~340 MB of them).
    opt.shutdown()
    dht.shutdown()


def _swarm_optimizer(config: SwarmPeerConfig, dht, counters):
    import torch

    from convforever.compression import CompressionConfig, build_averaging_kwargs
    from convforever.model import ModelConfig, create_model
    from convforever.peer.replica import ReplicaOptimizer
    from convforever.peer.trainer import SwarmOptimizer

    torch.manual_seed(0)  # every peer starts from the same state, as ConvForever's seeded initialisation does
    model = create_model(ModelConfig(name=config.model, num_classes=1000))
    params = list(model.parameters())
    # PowerSGD from the first round: the bench measures a swarm in its steady state, not its 8-bit warm-up
    compression = CompressionConfig(mode=config.mode, rank=config.rank, warmup_steps=0)
    averaging = build_averaging_kwargs(compression, counters, params)
    factory = averaging.pop("grad_averager_factory")
    replica = config.kind == "replica"
    opt = (ReplicaOptimizer if replica else SwarmOptimizer)(
        dht=dht, run_id=config.run_id, params=params,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6),  # tiny steps: what is measured is the traffic
        batch_size_per_step=config.batch_per_step, target_batch_size=config.target_batch_size,
        matchmaking_time=config.matchmaking_time, averaging_timeout=config.averaging_timeout,
        next_chunk_timeout=config.next_chunk_timeout, average_state_every=config.average_state_every,
        delay_grad_averaging=config.delay_grad_averaging and not replica,
        delay_optimizer_step=config.delay_optimizer_step and not replica,
        grad_averager_factory=lambda **kw: factory(request_timeout=config.request_timeout, **kw),
        averager_opts=dict(request_timeout=config.request_timeout), tracker_opts=dict(default_refresh_period=1.0),
        reuse_grad_buffers=config.gpu_like and not replica, offload_optimizer=config.gpu_like, verbose=False,
        **averaging,
    )
    return opt, params


def run_swarm_peer(config: SwarmPeerConfig) -> None:
    """Train (emulated compute, as run_optimizer) until the parent says ``stop``; emit ``progress`` with the
    cumulative samples every ``report_every_s`` (wall-clock stamped, so the parent can cut windows)."""
    import queue
    import threading

    import torch

    from convforever.compression import TrafficCounters

    dht = _setup(config.address)
    counters = TrafficCounters()  # before the averagers fork
    opt, params = _swarm_optimizer(config, dht, counters)
    generator = torch.Generator().manual_seed(config.peer)
    grads = [torch.randn(p.shape, generator=generator).mul_(1e-3) for p in params]
    emit(event="ready", maddrs=[str(a) for a in dht.get_visible_maddrs()], params=sum(p.numel() for p in params))
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [inbox.put(c.get("cmd")) for c in commands()] + [inbox.put("stop")],
                     daemon=True).start()
    wanted = "join" if config.kind == "joiner" else "go"
    while (command := inbox.get()) not in (wanted, "stop"):
        pass
    if command == "stop":
        return
    if config.kind == "joiner":
        began = time.time()
        opt.load_state_from_peers()
        emit(event="joined", began=began, ended=time.time(), epoch=opt.local_epoch,
             global_epoch=opt.tracker.global_epoch)
    if config.gpu_like and config.kind != "replica":
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
    samples, epoch, last_report = 0, opt.local_epoch, 0.0
    emit(event="progress", time=time.time(), samples=0, epoch=opt.local_epoch)
    while inbox.empty():
        if config.kind == "replica":
            opt.step()
            time.sleep(0.05)
        else:
            time.sleep(config.compute_s)  # the forward/backward a GPU would be running
            opt.step()
            samples += config.batch_per_step
            if config.gpu_like and opt.local_epoch != epoch:  # hivemind zeroed .grad for the new epoch: refill
                epoch = opt.local_epoch
                with torch.no_grad():
                    for param, grad in zip(params, grads, strict=True):
                        param.grad.copy_(grad)
        if time.time() - last_report >= config.report_every_s:
            last_report = time.time()
            emit(event="progress", time=last_report, samples=samples, epoch=opt.local_epoch)
    emit(event="done", time=time.time(), samples=samples, epoch=opt.local_epoch,
         group_sizes={str(k): v for k, v in opt.group_sizes.items()}, traffic=asdict(counters.snapshot()))
    opt.shutdown()  # orderly: torch unlinks the shared tensors' files in /dev/shm
    dht.shutdown()


def main(argv: Optional[list[str]] = None) -> None:
    role, raw = (argv if argv is not None else sys.argv[1:])[:2]
    config = json.loads(raw)
    address = NodeAddress(**config.pop("address"))
    try:
        if role == "dht":
            run_dht(address)
        elif role == "rounds":
            run_rounds(RoundsConfig(address=address, **config))
        elif role == "optimizer":
            run_optimizer(OptimizerConfig(address=address, **config))
        elif role == "swarm":
            run_swarm_peer(SwarmPeerConfig(address=address, **config))
        else:
            raise ValueError(f"unknown role {role!r}")
    except BaseException as e:
        emit(event="error", message=repr(e))
        raise


if __name__ == "__main__":
    main()
