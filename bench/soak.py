"""Soak: 4 peers and a coordinator train for half an hour on loopback; does memory stay flat, is any round lost?

Everything runs through the real CLIs (``convforever-coordinator``, ``convforever-peer -v``) on a generated
PD-Extended dataset: convnext_atto at 32 px, PowerSGD + 8-bit (the default), leases and checkpoints on. Halfway
through, one peer is SIGKILLed on purpose (process group: trainer, averagers, p2p daemon) and a fresh one takes its
place a minute later, loading the state from the others. At the end every process gets SIGINT, as Ctrl+C would.

Figures:
- memory: every minute, each peer's proportional set size (PSS, /proc/PID/smaps_rollup, summed over its process
  group: the fork-shared pages of hivemind's children count once) and the coordinator's. The baseline is the
  sample at ``--baseline-min`` (after warm-up: allocator pools, first all-reduce, first checkpoint); the ratio is
  the last sample over it, and the slope is a least-squares fit over the samples from the baseline on.
- rounds: each peer's hivemind log (``-v``) says, per epoch, "Averaged gradients with N peers", "Averaging
  gradients failed", or "Skipped averaging". A round is lost when it failed or was skipped; the ones within
  ``--kill-window-s`` after the kill (and the restarted peer's first) are counted apart, as killed on purpose, and so
  is the round a peer leaves on Ctrl+C at the end ("left the pending averaging round to exit").
- exit: seconds from SIGINT to exit, and whether any log holds a traceback.

    python bench/soak.py [--minutes 30] [--peers 4] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import append_results  # noqa: E402

AVERAGED = re.compile(r"Averaged gradients with (\d+) peers")
LOST = re.compile(r"Averaging gradients failed|Skipped averaging")
CATCH_UP = re.compile(r"Catching up with collaboration step")
STAMP = re.compile(r"^(\w{3} +\d+ \d\d:\d\d:\d\d)\.(\d+) ")  # hivemind's log line prefix: "Nov 27 18:30:37.786 "


@dataclass
class Proc:
    """One CLI process in its own session (so a kill takes its hivemind children with it), logging to a file."""

    name: str
    args: list[str]
    log: Path
    popen: Optional[subprocess.Popen] = None
    pss_mb: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.popen = subprocess.Popen(self.args, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def group_pss_mb(pgid: int) -> float:
    """PSS of every process in group ``pgid``, in MB (0 if the group is gone)."""
    total_kb = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            rollup = Path(f"/proc/{entry}/smaps_rollup").read_text()
        except (OSError, ProcessLookupError):
            continue  # exited between listing and reading
        match = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
        total_kb += int(match.group(1)) if match else 0
    return total_kb / 1024


def slope_per_min(samples: list[float]) -> float:
    """Least-squares slope of ``samples`` taken one minute apart."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(samples) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(samples))
    return num / sum((x - mean_x) ** 2 for x in range(n))


def log_time(line: str) -> Optional[float]:
    match = STAMP.match(line)
    if not match:
        return None
    year = datetime.date.today().year  # hivemind's stamps carry none
    stamp = datetime.datetime.strptime(f"{year} {match.group(1)}", "%Y %b %d %H:%M:%S")
    return stamp.timestamp() + float("0." + match.group(2))


def count_rounds(log: Path, kill_span: tuple[float, float]) -> dict:
    """Rounds averaged and lost in one peer's log; lost rounds inside ``kill_span`` are counted as ``on_purpose``."""
    averaged, lost, on_purpose, catch_ups, sizes, stopping = 0, 0, 0, 0, [], False
    for line in log.read_text(errors="replace").splitlines():
        stopping = stopping or "received SIGINT" in line
        if match := AVERAGED.search(line):
            averaged += 1
            sizes.append(int(match.group(1)))
        elif LOST.search(line):
            when = log_time(line)
            if stopping or (when is not None and kill_span[0] <= when <= kill_span[1]):
                on_purpose += 1
            else:
                lost += 1
        elif CATCH_UP.search(line):
            catch_ups += 1
    return {"averaged": averaged, "lost": lost, "on_purpose": on_purpose, "catch_ups": catch_ups,
            "mean_group": sum(sizes) / len(sizes) if sizes else 0.0}


def status(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/status", timeout=10) as response:
        return json.loads(response.read())


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s; see the logs")


def stop(proc: Proc, timeout: float = 30.0) -> tuple[float, Optional[int]]:
    """SIGINT (Ctrl+C) the process; seconds until it exited and its code (None: SIGKILLed after ``timeout``)."""
    if not proc.alive():
        return 0.0, proc.popen.returncode if proc.popen else None
    began = time.monotonic()
    proc.popen.send_signal(signal.SIGINT)
    try:
        code = proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait()
        code = None
    return time.monotonic() - began, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--baseline-min", type=int, default=5, help="the memory sample the others are compared with")
    parser.add_argument("--kill-window-s", type=float, default=60.0,
                        help="rounds lost this long after the kill (and before the new peer's first) are on purpose")
    parser.add_argument("--work", type=Path, default=None, help="keep the logs here (default: a temporary folder)")
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"soak: logs in {work}", flush=True)
    py = sys.executable
    subprocess.run([py, "-m", "convforever.data.demo", "--out", str(work / "data"), "--train-rows", "4000",
                    "--eval-rows", "20", "--image-size", "32", "--seed", "3"], check=True, capture_output=True)
    maddrs = work / "maddrs.txt"
    coordinator = Proc("coordinator", [
        py, "-m", "convforever.coordinator.cli", "--run-id", "soak", "--checkpoint-dir", str(work / "ckpt"),
        "--checkpoint-every", "25", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--maddrs-file", str(maddrs),
        "--http-port", "0", "--http-host", "127.0.0.1", "--dataset", str(work / "data" / "train"),
        "--shard-rows", "250"],
        work / "coordinator.log")
    coordinator.start()
    peers: list[Proc] = []
    restarted: Optional[Proc] = None
    kill_span = (float("inf"), float("-inf"))
    try:
        initial = wait_for(lambda: maddrs.is_file() and maddrs.read_text().split(), 60, "the coordinator's address")
        url = wait_for(lambda: re.search(r"HTTP API at (\S+)", coordinator.log.read_text()), 60,
                       "the coordinator's HTTP API").group(1)
        common = ["--initial-peers", *initial, "--run-id", "soak", "--model", "convnext_atto", "--image-size", "32",
                  "--batch-size", "16", "--target-batch-size", "128", "--lr", "2e-3", "--matchmaking-time", "3",
                  "--averaging-timeout", "30", "--report-every", "30", "--num-workers", "0", "--threads", "1",
                  "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--min-peers", "2", "--exit-grace", "0", "--no-augment", "-v"]

        def peer(name: str) -> Proc:
            return Proc(name, [py, "-m", "convforever.peer.cli", *common], work / f"{name}.log")

        peers = [peer(f"peer{i}") for i in range(args.peers)]
        for p in peers:
            p.start()
        began = time.monotonic()
        kill_at, restart_at = args.minutes * 30, args.minutes * 30 + 60  # seconds after start
        steps: list[int] = []
        for minute in range(int(args.minutes) + 1):
            wait_until = began + minute * 60
            while time.monotonic() < wait_until:
                now = time.monotonic() - began
                if peers[-1].alive() and restarted is None and now >= kill_at:
                    os.killpg(peers[-1].popen.pid, signal.SIGKILL)
                    peers[-1].popen.wait()
                    kill_span = (time.time(), time.time() + args.kill_window_s)
                    print(f"soak: {now:.0f} s: SIGKILLed {peers[-1].name}", flush=True)
                if restarted is None and now >= restart_at:
                    restarted = peer(f"peer{args.peers}")
                    restarted.start()
                    peers.append(restarted)
                    kill_span = (kill_span[0], time.time() + args.kill_window_s)
                    print(f"soak: {now:.0f} s: started {restarted.name} in its place", flush=True)
                time.sleep(1.0)
            for p in [*peers, coordinator]:
                p.pss_mb.append(group_pss_mb(p.popen.pid) if p.alive() else float("nan"))
            steps.append(status(url)["global_step"])
            dead = [p.name for p in peers[:-2] if not p.alive()]
            assert not dead, f"{dead} exited on their own; see their logs in {work}"
            memory = " ".join(f"{p.name} {p.pss_mb[-1]:.0f}" for p in [*peers, coordinator])
            print(f"soak: minute {minute}: global step {steps[-1]}, PSS MB: {memory}", flush=True)
    finally:
        exits = {p.name: stop(p) for p in [*peers, coordinator]}
    report(args, work, peers, coordinator, steps, exits, kill_span)


def report(args, work: Path, peers: list[Proc], coordinator: Proc, steps: list[int],
           exits: dict[str, tuple[float, Optional[int]]], kill_span: tuple[float, float]) -> None:
    base = args.baseline_min
    rows = []
    for p in [*peers, coordinator]:
        series = [m for m in p.pss_mb[base:] if m == m]  # drop the minutes it was not running
        rounds = count_rounds(p.log, kill_span) if p is not coordinator else {}
        rows.append((p, series, rounds))
    tracebacks = [p.name for p in [*peers, coordinator] if "Traceback" in p.log.read_text(errors="replace")]
    lines = [
        f"## Soak: {args.peers} peers and a coordinator on loopback, {args.minutes:.0f} min "
        f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python bench/soak.py --minutes {args.minutes:g} --peers {args.peers}`: convnext_atto at 32 px, batch 16, "
        f"target batch 128, PowerSGD + 8-bit (default), `--min-peers 2`, checkpoints every 25 steps; "
        f"{peers[args.peers - 1].name} SIGKILLed at {args.minutes / 2:g} min, {peers[-1].name} started a minute "
        f"later. Global step {steps[0]} -> {steps[-1]} ({(steps[-1] - steps[0]) / args.minutes:.1f}/min). "
        f"Memory is PSS of each process group; baseline = minute {base}.",
        "",
        "| process | PSS at baseline MB | PSS last MB | last / baseline | slope MB/min | rounds averaged | "
        "mean group | lost | lost on purpose (kill, Ctrl+C) | state reloads | SIGINT exit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p, series, rounds in rows:
        seconds, code = exits[p.name]
        killed = p is peers[args.peers - 1] and len(peers) > args.peers
        exit_text = "SIGKILLed on purpose" if killed else f"{seconds:.1f} s, code {code}"
        if series:
            memory = f"{series[0]:.0f} | {series[-1]:.0f} | {series[-1] / series[0]:.3f} | {slope_per_min(series):+.2f}"
        else:
            memory = "- | - | - | -"
        counted = (f"{rounds['averaged']} | {rounds['mean_group']:.2f} | {rounds['lost']} | {rounds['on_purpose']} | "
                   f"{rounds['catch_ups']}" if rounds else "- | - | - | - | -")
        lines.append(f"| {p.name} | {memory} | {counted} | {exit_text} |")
    lines += ["", f"Logs with a traceback: {', '.join(tracebacks) or 'none'}.", ""]
    text = "\n".join(lines)
    print(text, flush=True)
    if not args.no_append:
        append_results(text)


if __name__ == "__main__":
    main()
