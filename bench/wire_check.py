"""What the kernel sees against what we count, per compression mode: explicit all-reduces of ConvNeXt-T gradients.

bench/compression.py counts the bytes hivemind serialises (our TrafficCounters); tests/test_netns.py checks them
against the network interface for fp32. Here each mode runs in a fresh pair of peers, each in its own network
namespace (bench/netns.py, unshaped links), averaging ConvNeXt-T-shaped gradients (28.6M values) ``--rounds`` times
through the mode's gradient averager, with no hivemind.Optimizer around it (no progress tracker, no metrics records:
only matchmaking, the all-reduce and the DHT underneath). Per mode and peer it reports our counted bytes sent and
received against the kernel's eth0 tx/rx over the same interval, and, before the first round, what eth0 carries
while the pair idles.

If eth0 matches the counters here, any excess measured in a training swarm (bench/home_links.py) comes from what
this leaves out: the optimizer's progress tracker, the peers' records and state traffic.

``--shapes one-1k`` averages a single 1024-value tensor instead: the payload is then ~nothing, and what eth0 carries
per round is the fixed cost of a round (matchmaking, the all-reduce's RPCs), which the columns "eth0 - counted" show
for the big model too.

    python bench/wire_check.py [--modes none 8bit powersgd-8bit] [--rounds 3] [--shapes convnext-t|one-1k] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from home_links import UNSHAPED, log  # noqa: E402
from netns import Lab  # noqa: E402
from netns_peer import drive_rounds, start_rounds_peers  # noqa: E402
from results import append_results  # noqa: E402

IDLE_S = 10.0
SHAPES = {"convnext-t": "ConvNeXt-T gradients", "one-1k": "one tensor of 1024 values"}


def convnext_tiny_shapes() -> list[list[int]]:
    from convforever.model import ModelConfig, create_model

    return [list(p.shape) for p in create_model(ModelConfig(name="convnext_tiny", num_classes=1000)).parameters()]


def run_mode(mode: str, shapes: list[list[int]], rounds: int) -> dict:
    with Lab("cfh-wire-") as lab:
        nodes = [lab.add_node(f"p{i}", UNSHAPED) for i in range(2)]
        peers = start_rounds_peers(lab, nodes, shapes=shapes, mode=mode, run_id=f"wire_{mode}", step_timeout=120.0)
        idle_start = lab.all_counters()
        time.sleep(IDLE_S)
        before = lab.all_counters()
        results = drive_rounds(peers, rounds, timeout=600, on_round=lambda index, got: log(
            f"[{mode}] round {index + 1}/{rounds}: groups {[r[-1]['group_size'] for r in got]}"))
        after = lab.all_counters()
    out = {"mode": mode, "rounds": rounds, "peers": []}
    for node, got in zip(nodes, results, strict=True):
        traffic = got[-1]["traffic"]
        out["peers"].append(dict(
            name=node.name, ok=all(r["ok"] for r in got), group_sizes=[r["group_size"] for r in got],
            counted_tx=traffic["grad_bytes_sent"], counted_rx=traffic["grad_bytes_received"],
            eth0_tx=after[node.name].tx_bytes - before[node.name].tx_bytes,
            eth0_rx=after[node.name].rx_bytes - before[node.name].rx_bytes,
            eth0_tx_packets=after[node.name].tx_packets - before[node.name].tx_packets,
            idle_tx_per_s=(before[node.name].tx_bytes - idle_start[node.name].tx_bytes) / IDLE_S,
        ))
    return out


def report(results: Sequence[dict], command: str, what: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"## Wire check: counted bytes against eth0 per mode, {what}, 2 peers ({now:%Y-%m-%d %H:%M} UTC)",
        "",
        f"`{command}` on {platform.node()} ({os.cpu_count()} CPU cores, shared). Each mode: a fresh pair in network "
        "namespaces (unshaped), explicit gradient all-reduces through the mode's averager (no hivemind.Optimizer), "
        "PowerSGD without warm-up.",
        "",
        "| mode | peer | rounds ok | counted tx MB/round | eth0 tx MB/round | eth0 / counted tx | counted rx MB/round | "
        "eth0 rx MB/round | eth0 / counted rx | eth0 - counted tx KB/round | eth0 tx packets/round | "
        "idle eth0 tx KB/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        n = r["rounds"]
        for p in r["peers"]:
            lines.append(
                f"| {r['mode']} | {p['name']} | {'yes' if p['ok'] else 'no'} {p['group_sizes']} | "
                f"{p['counted_tx'] / n / 1e6:.3f} | {p['eth0_tx'] / n / 1e6:.3f} | {p['eth0_tx'] / p['counted_tx']:.2f} | "
                f"{p['counted_rx'] / n / 1e6:.3f} | {p['eth0_rx'] / n / 1e6:.3f} | {p['eth0_rx'] / p['counted_rx']:.2f} | "
                f"{(p['eth0_tx'] - p['counted_tx']) / n / 1e3:.1f} | {p['eth0_tx_packets'] / n:.0f} | "
                f"{p['idle_tx_per_s'] / 1e3:.1f} |")
    lines += ["", "eth0 / counted: the kernel's bytes over ours for the same interval (headers, ACKs, libp2p framing, "
              "matchmaking and DHT messages are the difference).", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["none", "8bit", "powersgd-8bit"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", choices=SHAPES, default="convnext-t")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    shapes = convnext_tiny_shapes() if args.shapes == "convnext-t" else [[1024]]
    results = []
    for mode in args.modes:
        log(f"mode {mode}: {len(shapes)} tensors, {sum(math.prod(s) for s in shapes)} values")
        results.append(run_mode(mode, shapes, args.rounds))
    command = "python bench/wire_check.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    table = report(results, command.strip(), SHAPES[args.shapes])
    print(table)
    if not args.no_append:
        append_results(table)


if __name__ == "__main__":
    main()
