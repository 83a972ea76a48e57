"""How much a peer joining a 2-peer swarm slows the others down, with and without a state replica to download from.

A joiner downloads the whole training state (ConvNeXt-T's 28.6M parameters and AdamW's two statistics, fp32:
~343 MB) before it can train. Without a replica it downloads from a training peer, whose 20 Mbit/s home uplink then
carries the state and its share of the gradient all-reduce at once: its averaging rounds stall, and with them the
swarm. With a replica (``convforever-peer --role replica`` next to the coordinator, peer/replica.py) the joiner
prefers it, since it advertises its state one half step above the training peers.

Setup (bench/netns.py namespaces; peers behind ``tc tbf`` home links, 20 Mbit/s up / 100 down by default; the
coordinator's DHT node and the replica on unshaped server links): two training peers and a joiner run ConvForever's
SwarmOptimizer (and the replica its ReplicaOptimizer) with the default compression (PowerSGD rank 4 + 8-bit), AdamW
and fixed random gradients; compute is emulated as in bench/home_links.py (256 images per local step at an RTX 3090's
813 img/s: 315 ms of sleep), so samples/s measures only what communication costs. Timeline per run: ``go``, then
``--warm-s`` seconds of training (the first ``--skip-s`` are not measured), then the joiner downloads the state and
trains too, ``--after-s`` seconds later everything stops.

Figures per run: the two training peers' samples/s before the join and while the joiner downloads (the ratio is the
slowdown), how long the download took, and who served it (our counters of state bytes sent). The first run is the
baseline the others are compared with.

    python bench/join_slowdown.py [--variants peer-donor,replica] [--warm-s 60] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from home_links import GPU_IMAGES_PER_S, UNSHAPED, log, wait_for_memory, wait_for_quiet_cpu  # noqa: E402
from netns import Child, Lab, LinkSpec  # noqa: E402
from results import append_results  # noqa: E402

PEER_SCRIPT = Path(__file__).with_name("netns_peer.py")
TRAINERS = ("peer0", "peer1")


@dataclass
class Settings:
    """What every peer of one run uses, and the run's timeline."""

    batch_per_step: int = 256
    target_batch_size: int = 16384
    mode: str = "powersgd-8bit"
    rank: int = 4
    matchmaking_time: float = 3.0
    averaging_timeout: float = 30.0
    average_state_every: int = 1000
    warm_s: float = 60.0
    skip_s: float = 20.0
    after_s: float = 20.0
    join_timeout_s: float = 600.0
    link: LinkSpec = field(default_factory=LinkSpec)

    @property
    def compute_s(self) -> float:
        return self.batch_per_step / GPU_IMAGES_PER_S


@dataclass
class RunResult:
    name: str
    replica: bool
    before: float  # the two training peers' samples/s before the join
    during: float  # ... while the joiner downloaded the state
    download_s: float
    joined_epoch: int  # the epoch of the state the joiner downloaded
    swarm_epoch: int  # the training peers' epoch when the download ended
    caught_up_s: float  # from the join until the joiner trained at the swarm's epoch (nan: not in the window)
    downloads: int  # full state downloads the joiner finished (more than one: it arrived too stale to go on)
    served_mb: dict[str, float]  # state download bytes each node sent
    joiner_rx_mb: float
    epochs: dict[str, int]
    load: tuple[float, float]

    @property
    def ratio(self) -> float:
        return self.during / self.before if self.before else math.nan


def samples_at(progress: list[dict], when: float) -> float:
    """Cumulative samples at wall time ``when``, interpolated between a peer's progress events."""
    points = sorted((e["time"], e["samples"]) for e in progress)
    for (t0, s0), (t1, s1) in itertools.pairwise(points):
        if t0 <= when <= t1:
            return s0 + (s1 - s0) * (when - t0) / (t1 - t0) if t1 > t0 else s1
    raise ValueError(f"no progress around t={when:.1f} (events from {points[0][0]:.1f} to {points[-1][0]:.1f})")


def rate(progress: dict[str, list[dict]], start: float, end: float) -> float:
    """The training peers' combined samples/s over [start, end]."""
    return sum(samples_at(progress[n], end) - samples_at(progress[n], start) for n in TRAINERS) / (end - start)


def caught_up_after(progress: dict[str, list[dict]], began: float) -> float:
    """Seconds from ``began`` to the joiner's first progress at most one epoch behind the training peers (hivemind
    lets such a peer go on; further behind, it downloads the state again); nan if that never happened."""
    for event in sorted(progress.get("joiner", []), key=lambda e: e["time"]):
        swarm = [e["epoch"] for n in TRAINERS for e in progress[n] if e["time"] <= event["time"]]
        if event["time"] > began and event["samples"] > 0 and swarm and event["epoch"] >= max(swarm) - 1:
            return event["time"] - began
    return math.nan


def full_downloads(log: list[str]) -> int:
    """hivemind's "Finished downloading state in X s" lines for whole states (the Q buffers take well under 1 s)."""
    times = [float(m.group(1)) for line in log if (m := re.search(r"Finished downloading state in ([\d.]+)s", line))]
    return sum(1 for t in times if t > 1.0)


def _spawn(lab: Lab, name: str, config: dict) -> Child:
    return lab.spawn(lab.nodes[name], [sys.executable, str(PEER_SCRIPT), "swarm", json.dumps(config)])


def _drain(children: Sequence[Child], progress: dict[str, list[dict]], until: float,
           wanted: Optional[tuple[str, str]] = None) -> Optional[dict]:
    """Collect progress events until wall time ``until`` (or the ``(child, event)`` wanted); return that event."""
    while time.time() < until:
        for child in children:
            try:
                event = child.next_event(timeout=0.2)
            except TimeoutError:
                continue
            if event["event"] == "progress":
                progress.setdefault(child.name, []).append(event)
            elif event["event"] == "error":
                raise RuntimeError(f"{child.name} failed: {event['message']}")
            if wanted is not None and (child.name, event["event"]) == wanted:
                return event
    return None


def run(name: str, replica: bool, settings: Settings, load_limit: float, max_wait: float) -> RunResult:
    wait_for_memory(8.0, max_wait)
    with Lab("cfh-join-") as lab:
        coord = lab.add_node("coord", UNSHAPED)
        for peer in (*TRAINERS, "joiner"):
            lab.add_node(peer, settings.link)
        if replica:
            lab.add_node("replica", UNSHAPED)  # the coordinator's box: a server's link
        dht = lab.spawn(coord, [sys.executable, str(PEER_SCRIPT), "dht",
                                json.dumps(dict(address=dict(listen=coord.listen_maddr, announce=coord.announce_maddr)))])
        bootstrap = dht.expect("ready", timeout=120)["maddrs"]
        children: list[Child] = []
        kinds = {"peer0": "train", "peer1": "train", "joiner": "joiner", **({"replica": "replica"} if replica else {})}
        for index, (node_name, kind) in enumerate(kinds.items()):
            node = lab.nodes[node_name]
            config = dict(
                address=dict(listen=node.listen_maddr, announce=node.announce_maddr, initial_peers=bootstrap),
                peer=index, kind=kind, steps=0, compute_s=settings.compute_s, batch_per_step=settings.batch_per_step,
                target_batch_size=settings.target_batch_size, mode=settings.mode, rank=settings.rank,
                run_id="join", matchmaking_time=settings.matchmaking_time,
                averaging_timeout=settings.averaging_timeout, average_state_every=settings.average_state_every,
                request_timeout=min(3.0, settings.matchmaking_time / 2), report_every_s=2.0,
            )
            children.append(_spawn(lab, node_name, config))
        for child in children:
            child.expect("ready", timeout=300)
        load_start = wait_for_quiet_cpu(load_limit, max_wait)
        log(f"[{name}] {len(children)} peers ready (load {load_start:.2f}); go, join in {settings.warm_s:g}s")
        progress: dict[str, list[dict]] = {}
        go = time.time()
        for child in children:
            if child.name != "joiner":
                child.send({"cmd": "go"})
        _drain(children, progress, go + settings.warm_s)
        rx_before = lab.counters("joiner").rx_bytes
        joiner = next(c for c in children if c.name == "joiner")
        joiner.send({"cmd": "join"})
        joined = _drain(children, progress, time.time() + settings.join_timeout_s, wanted=("joiner", "joined"))
        if joined is None:
            raise TimeoutError(f"[{name}] the joiner did not finish its download in {settings.join_timeout_s:g}s")
        joiner_rx = lab.counters("joiner").rx_bytes - rx_before
        log(f"[{name}] downloaded the state of epoch {joined['epoch']} in "
            f"{joined['ended'] - joined['began']:.0f}s, {joiner_rx / 1e6:.0f} MB received")
        _drain(children, progress, time.time() + settings.after_s)
        for child in children:
            child.send({"cmd": "stop"})
        done: dict[str, dict] = {}
        for child in children:
            while (event := child.next_event(timeout=120))["event"] != "done":
                pass
            done[child.name] = event
        swarm_epoch = max(e["epoch"] for n in TRAINERS for e in progress[n] if e["time"] <= joined["ended"])
        result = RunResult(
            name=name, replica=replica,
            before=rate(progress, go + settings.skip_s, joined["began"]),
            during=rate(progress, joined["began"], joined["ended"]),
            caught_up_s=caught_up_after(progress, joined["began"]), downloads=full_downloads(joiner.log),
            download_s=joined["ended"] - joined["began"], joined_epoch=joined["epoch"], swarm_epoch=swarm_epoch,
            served_mb={n: d["traffic"]["state_download_bytes_sent"] / 1e6 for n, d in done.items()},
            joiner_rx_mb=joiner_rx / 1e6, epochs={n: d["epoch"] for n, d in done.items()},
            load=(load_start, os.getloadavg()[0]),
        )
    log(f"[{name}] {result.before:.0f} samples/s before, {result.during:.0f} during the download "
        f"({result.ratio:.2f}x), download {result.download_s:.0f}s")
    return result


def report(results: Sequence[RunResult], settings: Settings, command: str) -> str:
    base = results[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"## Join slowdown: a peer joins a 2-peer swarm on emulated home links ({now:%Y-%m-%d %H:%M} UTC)",
        "",
        f"`{command}` on {platform.node()} ({os.cpu_count()} CPU cores, shared). Two training peers and a joiner "
        f"behind {settings.link.describe()}, the coordinator's DHT node (and the replica) unshaped; ConvNeXt-T "
        f"(28.6M parameters) under SwarmOptimizer with AdamW, {settings.mode} rank {settings.rank}, target batch "
        f"{settings.target_batch_size}; compute emulated as {settings.batch_per_step} images at "
        f"{GPU_IMAGES_PER_S:g} img/s ({settings.compute_s * 1000:.0f} ms per local step; the two peers' ceiling is "
        f"{2 * GPU_IMAGES_PER_S:.0f} samples/s).",
        "",
        "| run | replica | samples/s before join | samples/s during download | during / before | vs first run's "
        "during | download s | joiner rx MB | state MB sent by | state's epoch (swarm's on arrival) | joiner's downloads | "
        "joiner trains in step after s | load start/end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        served = ", ".join(f"{n} {mb:.0f}" for n, mb in r.served_mb.items() if mb >= 1) or "-"
        lines.append(
            f"| {r.name} | {'yes' if r.replica else 'no'} | {r.before:.0f} | {r.during:.0f} | {r.ratio:.2f} | "
            f"{r.during / base.during if base.during else math.nan:.2f} | {r.download_s:.0f} | {r.joiner_rx_mb:.0f} | "
            f"{served} | {r.joined_epoch} ({r.swarm_epoch}) | {r.downloads} | "
            f"{'never' if math.isnan(r.caught_up_s) else f'{r.caught_up_s:.0f}'} | {r.load[0]:.1f} / {r.load[1]:.1f} |")
    lines += [
        "",
        f"samples/s: the two training peers' emulated-compute samples per second, summed; before: from "
        f"{settings.skip_s:g} s after the start to the join, during: while the joiner's load_state_from_peers ran. "
        "state MB sent by: our counters of state-download bytes each node sent (who served the joiner). state's epoch: "
        "the epoch of the state the joiner received, and the training peers' epoch when it arrived (hivemind lets a "
        "peer one epoch behind go on; further behind, it downloads again). joiner's downloads: whole states it "
        f"downloaded before the end ({settings.after_s:g} s after the first download). joiner trains in step after: "
        "seconds from the join until the joiner trained at most one epoch behind the swarm (never: not within the "
        "run).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="peer-donor,replica",
                   help="runs in order: peer-donor (no replica: a training peer serves the state), replica")
    p.add_argument("--warm-s", type=float, default=d.warm_s, help="seconds of training before the join")
    p.add_argument("--after-s", type=float, default=d.after_s, help="seconds of training after the join")
    p.add_argument("--target-batch-size", type=int, default=d.target_batch_size)
    p.add_argument("--up-mbit", type=float, default=20.0)
    p.add_argument("--down-mbit", type=float, default=100.0)
    p.add_argument("--load-limit", type=float, default=2.5, help="wait for the 1-min load average below this")
    p.add_argument("--max-load-wait", type=float, default=300.0)
    p.add_argument("--no-append", action="store_true", help="print the table without appending to RESULTS.md")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    args = p.parse_args(argv)
    settings = Settings(warm_s=args.warm_s, after_s=args.after_s, target_batch_size=args.target_batch_size,
                        link=LinkSpec(up_mbit=args.up_mbit, down_mbit=args.down_mbit))
    known = {"peer-donor": False, "replica": True}
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if unknown := [n for n in names if n not in known]:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(known)}")
    results = []
    for name in names:
        try:
            results.append(run(name, known[name], settings, args.load_limit, args.max_load_wait))
        except (Exception, SystemExit) as e:  # keep what was measured; say which run failed
            log(f"run {name} failed ({e!r}); reporting the runs before it")
            break
    if not results:
        raise SystemExit("no run completed")
    command = "python bench/join_slowdown.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    table = report(results, settings, command.strip())
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1), encoding="utf-8")
    print(table)
    if not args.no_append:
        append_results(table)
    if len(results) < len(names):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
