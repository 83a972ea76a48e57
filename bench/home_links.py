"""Four peers on emulated home links: how much of the wall time goes to compute once hivemind overlaps communication.

Each peer and the coordinator's DHT bootstrap node (a plain hivemind DHT node: the only part of the coordinator that
the peers' swarm traffic touches) run in their own network namespace (bench/netns.py). Peers sit behind ``tc tbf``
links of 20 Mbit/s up / 100 Mbit/s down, optionally with extra latency from the user-space relay; the coordinator's
link is a server's, unshaped. Each peer (bench/netns_peer.py) runs a real hivemind.Optimizer with ConvForever's
compression (``build_averaging_kwargs``, PowerSGD rank 4 with 8-bit factors by default) on ConvNeXt-T's 28.6M
parameters, with fixed random gradients and plain SGD (the optimizer's arithmetic is not what is measured).

Compute is emulated, so the measurement isolates communication: before each ``opt.step()`` a peer sleeps
``batch_per_step / 813`` seconds, the time an RTX 3090 takes to train ConvNeXt-T on that many 224x224 images (timm's
published 813 img/s). The default 256 samples per step are two micro-batches of 128 that the GPU accumulates in
``.grad`` between two calls: 315 ms. Peers run hivemind's GPU setup for delayed updates (reuse_grad_buffers +
offload_optimizer, see ``netns_peer.OptimizerConfig.gpu_like``; ``--hivemind-accumulators`` measures its defaults
instead, whose per-step 28.6M-value add costs this CPU ~10% on its own). Everything a peer's main thread does besides
the sleep (waiting for an averaging round or a delayed optimizer step, the epoch bookkeeping) counts as not computing;
the figure reported is compute / wall time per peer.

The first run of a call is the baseline: by default the same loop on unshaped links, which shows what the shared
2-core CPU costs (PowerSGD and the optimizer step run on it, slowed by whatever else the machine runs), so the ratio
to it isolates the links. Each run waits for the 1-min load average to drop below ``--load-limit`` (at most
``--max-load-wait`` s) before it starts. Progress goes to stderr; the table is printed and appended to
bench/RESULTS.md.

    python bench/home_links.py [--variants unshaped,home,home-nodelay,home-latency] [--steps 120]
        [--target-batch-size 16384] [--latency-ms 50] [--json FILE] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import Child, IfaceCounters, Lab, LinkSpec  # noqa: E402
from results import append_results  # noqa: E402

from convforever.peer.progress import REPORT_INTERVAL  # noqa: E402

PEER_SCRIPT = Path(__file__).with_name("netns_peer.py")
GPU_IMAGES_PER_S = 813.0  # timm: convnext_tiny training throughput on an RTX 3090, AMP, 224x224
UNSHAPED = LinkSpec(up_mbit=None, down_mbit=None)
PARTIAL_ROUND = "Averaging: received"
IDLE_S = 10.0  # the idle window before the start, to measure the background (DHT, progress tracker) traffic


@dataclass
class SwarmSettings:
    """What every peer of one run uses (all must agree)."""

    peers: int = 4
    steps: int = 120
    batch_per_step: int = 256
    target_batch_size: int = 16384
    mode: str = "powersgd-8bit"
    rank: int = 4
    matchmaking_time: float = 3.0
    averaging_timeout: float = 30.0
    next_chunk_timeout: Optional[float] = None  # hivemind's default: matchmaking_time
    average_state_every: int = 1000
    delay: bool = True  # delay_grad_averaging and delay_optimizer_step together
    gpu_like: bool = True  # reuse_grad_buffers + offload_optimizer (see netns_peer.OptimizerConfig.gpu_like)
    progress_interval: float = REPORT_INTERVAL  # the peer's progress tracker (0: a record per step, as hivemind's)

    @property
    def compute_s(self) -> float:
        return self.batch_per_step / GPU_IMAGES_PER_S


@dataclass
class Variant:
    """One measured run: a name, the peers' link, the swarm settings."""

    name: str
    link: LinkSpec
    swarm: SwarmSettings


@dataclass
class PeerResult:
    name: str
    done: dict
    iface: IfaceCounters
    partial_rounds: int = 0  # hivemind's "Averaging: received N% results" warnings: groupmates that timed out


@dataclass
class VariantResult:
    variant: Variant
    peers: list[PeerResult] = field(default_factory=list)
    coordinator_iface: Optional[IfaceCounters] = None
    load: tuple[float, float] = (math.nan, math.nan)
    qdiscs: dict[str, list] = field(default_factory=dict)
    idle_tx: float = math.nan  # bytes/s a peer sends while the swarm idles before the start: DHT and tracker only

    @property
    def compute_fraction(self) -> float:
        return sum(p.done["compute_fraction"] for p in self.peers) / len(self.peers)

    @property
    def wall(self) -> float:
        return max(p.done["wall"] for p in self.peers)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _spawn(lab: Lab, name: str, role: str, config: dict) -> Child:
    return lab.spawn(lab.nodes[name], [sys.executable, str(PEER_SCRIPT), role, json.dumps(config)])


def wait_for_quiet_cpu(limit: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) for the 1-min load average to drop below ``limit``: the cores are shared."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        log(f"waiting for the load average ({os.getloadavg()[0]:.2f}) to drop below {limit}")
        time.sleep(10)
    return os.getloadavg()[0]


def available_memory_gb() -> float:
    with open("/proc/meminfo", encoding="utf-8") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def wait_for_memory(min_gb: float, max_wait: float) -> None:
    """Refuse to start peers the machine cannot hold: on a shared box the OOM killer would pick someone's job."""
    deadline = time.monotonic() + max_wait
    while available_memory_gb() < min_gb:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {available_memory_gb():.1f} GiB of memory available, the peers need "
                             f"~{min_gb:g} (--min-free-gb): not starting them")
        log(f"waiting for {min_gb:g} GiB of available memory ({available_memory_gb():.1f} now)")
        time.sleep(10)


def run_variant(variant: Variant, load_limit: float, max_load_wait: float, min_free_gb: float) -> VariantResult:
    swarm = variant.swarm
    wait_for_memory(min_free_gb, max_load_wait)
    with Lab("cfh-bench-") as lab:
        coordinator = lab.add_node("coord", UNSHAPED)
        for i in range(swarm.peers):
            lab.add_node(f"peer{i}", variant.link)
        dht = _spawn(lab, "coord", "dht", dict(address=dict(listen=coordinator.listen_maddr,
                                                            announce=coordinator.announce_maddr)))
        bootstrap = dht.expect("ready", timeout=120)["maddrs"]
        log(f"[{variant.name}] coordinator DHT up at {bootstrap[0]}; starting {swarm.peers} peers")
        peers = []
        for i in range(swarm.peers):
            node = lab.nodes[f"peer{i}"]
            config = dict(
                address=dict(listen=node.listen_maddr, announce=node.announce_maddr, initial_peers=bootstrap),
                peer=i, steps=swarm.steps, compute_s=swarm.compute_s, batch_per_step=swarm.batch_per_step,
                target_batch_size=swarm.target_batch_size, mode=swarm.mode, rank=swarm.rank,
                matchmaking_time=swarm.matchmaking_time, averaging_timeout=swarm.averaging_timeout,
                next_chunk_timeout=swarm.next_chunk_timeout, average_state_every=swarm.average_state_every, delay_grad_averaging=swarm.delay,
                delay_optimizer_step=swarm.delay, gpu_like=swarm.gpu_like, request_timeout=min(3.0, swarm.matchmaking_time / 2),
                progress_interval=swarm.progress_interval,
            )
            peers.append(_spawn(lab, node.name, "optimizer", config))
        for peer in peers:
            peer.expect("ready", timeout=300)
        load_start = wait_for_quiet_cpu(load_limit, max_load_wait)
        idle = lab.all_counters()
        time.sleep(IDLE_S)
        result = VariantResult(variant, idle_tx=sum((lab.counters(f"peer{i}") - idle[f"peer{i}"]).tx_bytes
                                                    for i in range(swarm.peers)) / swarm.peers / IDLE_S)
        log(f"[{variant.name}] all peers ready (load {load_start:.2f}); go: {swarm.steps} steps of "
            f"{swarm.compute_s * 1000:.0f} ms emulated compute each, link {variant.link.describe()}")
        before = lab.all_counters()
        for peer in peers:
            peer.send({"cmd": "go"})
        done: dict[str, dict] = {}
        timeout = swarm.steps * swarm.compute_s * 4 + 300
        deadline = time.monotonic() + timeout
        while len(done) < len(peers):
            for peer in peers:
                if peer.name in done:
                    continue
                try:
                    event = peer.next_event(timeout=0.5)
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"[{variant.name}] peers did not finish in {timeout:.0f}s") from None
                    continue
                if event["event"] == "progress":
                    log(f"[{variant.name}] {peer.name}: step {event['step']}/{swarm.steps}, epoch {event['epoch']}, "
                        f"compute {event['compute_fraction']:.1%} of {event['wall']:.0f}s, "
                        f"group sizes {event['group_sizes']}")
                elif event["event"] == "done":
                    done[peer.name] = event
        # Rounds a peer joins after its last step (and state it serves) still count: read the kernel's counters
        # and ours at the same moment, once every peer is done.
        after = lab.all_counters()
        for peer in peers:
            peer.send({"cmd": "final"})
        for peer in peers:
            done[peer.name]["traffic"] = peer.expect("final", timeout=30)["traffic"]
        load_end = os.getloadavg()[0]
        result.load = (load_start, load_end)
        for peer in peers:
            partial = sum(1 for line in peer.log if PARTIAL_ROUND in line)
            result.peers.append(PeerResult(peer.name, done[peer.name], after[peer.name] - before[peer.name], partial))
        result.coordinator_iface = after["coord"] - before["coord"]
        result.qdiscs = {name: lab.qdisc_stats(name) for name in lab.nodes if name != "coord"}
    log(f"[{variant.name}] compute fraction {result.compute_fraction:.1%} (mean over peers), wall {result.wall:.0f}s")
    return result


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f}"


def _groups(result: VariantResult) -> str:
    """Epochs summed over peers by the size of the group their gradients were averaged in."""
    groups: dict[int, int] = {}
    for p in result.peers:
        for size, count in p.done["group_sizes"].items():
            groups[int(size)] = groups.get(int(size), 0) + count
    return ", ".join(f"{size}: {count}" for size, count in sorted(groups.items(), reverse=True))


def report(results: Sequence[VariantResult], command: str) -> str:
    baseline = results[0]
    first = results[0].variant.swarm
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"## Home links: {first.peers} peers behind emulated home links ({now:%Y-%m-%d %H:%M} UTC)",
        "",
        f"`{command}` on {platform.node()} ({os.cpu_count()} CPU cores, {platform.machine()}, shared with other "
        f"jobs; Python {platform.python_version()}). {first.peers} peers + the coordinator's DHT bootstrap node, each "
        "in its own network namespace (bench/netns.py; peers behind tbf, the coordinator unshaped). ConvNeXt-T "
        f"(28.6M parameters) under hivemind.Optimizer with SGD, {first.mode} rank {first.rank}, fixed random "
        f"gradients; compute emulated as {first.batch_per_step} images / {GPU_IMAGES_PER_S:g} img/s (RTX 3090, "
        f"timm) = {first.compute_s * 1000:.0f} ms of sleep per local step, {first.steps} steps per peer.",
        "",
        "| run | peers' link | delayed grads + step | target batch | matchmaking / timeout s | state every | "
        "epochs | groups (size: epochs) | partial | compute % of wall | vs first | wall s | median / longest step s | "
        "grad KB sent/round | eth0 tx MB/peer | counted MB/peer | other tx KB/s/peer (idle) | tbf drops up/down | "
        "load start/end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        swarm, link, peers = result.variant.swarm, result.variant.link, result.peers
        traffic = [p.done["traffic"] for p in peers]
        rounds = sum(t["grad_rounds"] for t in traffic)
        sent = sum(t["grad_bytes_sent"] for t in traffic)
        counted = sum(counted_bytes(p) for p in peers)
        tx = sum(p.iface.tx_bytes for p in peers)
        other = sum((p.iface.tx_bytes - counted_bytes(p)) / p.done["wall"] for p in peers) / len(peers)
        epochs = sorted(p.done["epoch"] for p in peers)
        lines.append(
            f"| {result.variant.name} | {link.describe()} | {'yes' if swarm.delay else 'no'} | "
            f"{swarm.target_batch_size} | {swarm.matchmaking_time:g} / {swarm.averaging_timeout:g} | "
            f"{swarm.average_state_every} | {epochs[0]}-{epochs[-1]} | {_groups(result)} | "
            f"{sum(p.partial_rounds for p in peers)} | {result.compute_fraction:.1%} | "
            f"{result.compute_fraction / baseline.compute_fraction:.3f} | {result.wall:.0f} | "
            f"{sorted(p.done['median_step'] for p in peers)[len(peers) // 2]:.3f} / "
            f"{max(p.done['longest_step'] for p in peers):.1f} | "
            f"{sent / rounds / 1e3 if rounds else math.nan:.0f} | {tx / len(peers) / 1e6:.2f} | "
            f"{counted / len(peers) / 1e6:.2f} | {other / 1e3:.0f} ({result.idle_tx / 1e3:.0f}) | {_drops(result)} | "
            f"{result.load[0]:.1f} / {result.load[1]:.1f} |"
        )
    lines += [
        "",
        "compute % of wall: per peer, time in the emulated-compute sleep over the wall time from the common start to "
        "its last step, mean over peers; vs first: ratio to the first row of the same run. groups: epochs summed "
        "over peers by the size of the group that averaged their gradients (1: alone, no group or a failed round); "
        "partial: hivemind's \"Averaging: received N% results\" warnings (a groupmate's part timed out). grad KB "
        "sent/round: our TrafficCounters per peer per completed round. eth0 tx: the kernel's counter on each "
        "peer's interface over the measured interval; counted: the gradient + state bytes our counters saw sent; "
        "other tx: the difference per second (TCP/IP headers, retransmissions, libp2p framing, DHT, progress "
        f"tracker and matchmaking traffic), in brackets the same measured over {IDLE_S:g} s of the swarm idling "
        "before the start. median / longest step: opt.step() per peer (median over peers of the median; the "
        "longest anywhere): the median is hivemind's per-step bookkeeping on this CPU (a 28.6M-value gradient "
        "accumulation), the longest the worst wait at an epoch boundary.",
        "",
    ]
    return "\n".join(lines)


def _drops(result: VariantResult) -> str:
    """Packets tbf dropped (queue full), summed over peers: upload (peer side), download (hub side)."""
    up = down = 0
    for stats in result.qdiscs.values():
        if len(stats) == 2:
            up, down = up + stats[0].get("drops", 0), down + stats[1].get("drops", 0)
    return f"{up} / {down}" if result.qdiscs and any(result.qdiscs.values()) else "-"


def counted_bytes(peer: PeerResult) -> int:
    t = peer.done["traffic"]
    return t["grad_bytes_sent"] + t["state_bytes_sent"] + t["state_download_bytes_sent"]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    d = SwarmSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="unshaped,home",
                   help="comma-separated runs, in order: unshaped (baseline), home (delayed averaging), "
                        "home-nodelay (hivemind's synchronous default), home-latency and home-latency-nodelay "
                        "(the same plus --latency-ms each way), unshaped-per-step (a progress record per local "
                        "step, as hivemind's tracker stores them, instead of one a second)")
    p.add_argument("--steps", type=int, default=d.steps, help="local steps per peer per run")
    p.add_argument("--batch-per-step", type=int, default=d.batch_per_step)
    p.add_argument("--target-batch-size", type=int, default=d.target_batch_size)
    p.add_argument("--mode", default=d.mode)
    p.add_argument("--matchmaking-time", type=float, default=d.matchmaking_time)
    p.add_argument("--averaging-timeout", type=float, default=d.averaging_timeout)
    p.add_argument("--next-chunk-timeout", type=float, default=d.next_chunk_timeout,
                   help="seconds a reducer waits for a groupmate's next part (hivemind's default: matchmaking time)")
    p.add_argument("--average-state-every", type=int, default=d.average_state_every)
    p.add_argument("--hivemind-accumulators", action="store_true",
                   help="let hivemind add .grad into its own accumulators every step (its default) instead of "
                        "reuse_grad_buffers + offload_optimizer")
    p.add_argument("--up-mbit", type=float, default=20.0)
    p.add_argument("--down-mbit", type=float, default=100.0)
    p.add_argument("--latency-ms", type=float, default=50.0,
                   help="one-way delay the relay adds to every connection in the home-latency runs")
    p.add_argument("--load-limit", type=float, default=2.0, help="wait for the 1-min load average below this")
    p.add_argument("--max-load-wait", type=float, default=300.0, help="seconds to wait for load and memory")
    p.add_argument("--min-free-gb", type=float, default=8.0,
                   help="available memory to wait for before starting the peers (each holds ~1.5 GiB)")
    p.add_argument("--no-append", action="store_true", help="print the table without appending to RESULTS.md")
    p.add_argument("--json", type=Path, help="also write every peer's raw figures here")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    swarm = SwarmSettings(steps=args.steps, batch_per_step=args.batch_per_step,
                          target_batch_size=args.target_batch_size, mode=args.mode,
                          matchmaking_time=args.matchmaking_time, averaging_timeout=args.averaging_timeout,
                          next_chunk_timeout=args.next_chunk_timeout, gpu_like=not args.hivemind_accumulators,
                          average_state_every=args.average_state_every)
    home = LinkSpec(up_mbit=args.up_mbit, down_mbit=args.down_mbit)
    far = replace(home, delay_ms=args.latency_ms)
    known = {
        "unshaped": Variant("unshaped", UNSHAPED, swarm),
        "unshaped-per-step": Variant("unshaped-per-step", UNSHAPED, replace(swarm, progress_interval=0.0)),
        "home": Variant("home", home, swarm),
        "home-nodelay": Variant("home-nodelay", home, replace(swarm, delay=False)),
        "home-latency": Variant("home-latency", far, swarm),
        "home-latency-nodelay": Variant("home-latency-nodelay", far, replace(swarm, delay=False)),
    }
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(known)}")
    results: list[VariantResult] = []
    failed: Optional[str] = None
    for name in names:
        log(f"run {name}: {json.dumps(asdict(known[name].swarm))}")
        try:
            results.append(run_variant(known[name], args.load_limit, args.max_load_wait, args.min_free_gb))
        except (Exception, SystemExit) as e:  # a peer lost to the OOM killer, a timeout: keep what was measured
            failed = f"{name}: {e!r}"
            log(f"run {failed} failed; reporting the runs before it")
            break
    if not results:
        raise SystemExit(f"no run completed ({failed})")
    command = "python bench/home_links.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    table = report(results, command.strip())
    if failed:
        table += f"\nNot measured: run {failed} failed, and the runs after it were skipped.\n"
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1, default=str), encoding="utf-8")
    print(table)
    if not args.no_append:
        append_results(table)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
