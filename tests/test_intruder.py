"""A private run with an intruder, all real processes on loopback.

A coordinator started with ``--access private`` hands out shards, two honest peers join with join tokens (one
through ``--token``, one through ``CONVFOREVER_TOKEN``), and an intruder process (tests/intruder.py) that knows
every multiaddr and holds only a revoked token tries to get a certificate, call the lease API, join the DHT, join
an averaging group, send tensor parts and download the state. What must hold:
  * the intruder is refused every time, and what it observes says why;
  * the honest peers still lease shards, train and average in pairs, and the coordinator (itself a certified
    member) still downloads their state for its checkpoints;
  * a peer started with a bad or revoked token exits at once with one line saying what to do.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUN = "priv"
MAX_STEPS = 4
HERE = Path(__file__).resolve().parent


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=log.open("a"), stderr=subprocess.STDOUT, env=env)


def wait_for(pattern: str, log: Path, procs: list[subprocess.Popen], timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text()) if log.exists() else None
        if found:
            return found
        for proc in procs:
            assert proc.poll() is None, f"a process exited early while waiting for {pattern!r}: {proc.args[1:4]}"
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {pattern!r} in {log.name}")


def token(ckpt: Path, *action: str) -> str:
    done = subprocess.run([sys.executable, "-m", "convforever.coordinator.cli", "token", *action,
                           "--checkpoint-dir", str(ckpt)], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def bad_secret(token: str) -> str:
    """The token with its secret changed: right run, right id, wrong secret (a typo, or a guess)."""
    prefix, token_id, secret, fingerprint = token.split(".")
    changed = ("y" if secret[0] == "x" else "x") + secret[1:]  # "x" + secret[1:] is no change 1 time in 64
    return ".".join((prefix, token_id, changed, fingerprint))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("intruder")
    subprocess.run([sys.executable, "-m", "convforever.data.demo", "--out", str(work / "data"), "--train-rows", "800",
                    "--eval-rows", "20", "--image-size", "32"], check=True, capture_output=True)
    ckpt = work / "ckpt"
    tokens = [token(ckpt, "create", "--name", f"peer{i}") for i in range(2)]
    stolen = token(ckpt, "create", "--name", "mallory")
    token(ckpt, "revoke", stolen.split(".")[1])
    coordinator = start(["-m", "convforever.coordinator.cli", "--run-id", RUN, "--checkpoint-dir", str(ckpt),
                         "--access", "private", "--dataset", str(work / "data" / "train"), "--shard-rows", "200",
                         "--checkpoint-every", "2", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                         "--maddrs-file", str(work / "maddrs.txt"), "--status-every", "1",
                         "--http-host", "127.0.0.1", "--http-port", "0"], work / "coordinator.log")
    peers: list[subprocess.Popen] = []
    facts: dict = {"work": work}
    try:
        url = wait_for(r"HTTP API at (\S+)", work / "coordinator.log", [coordinator], 90).group(1)
        maddrs = (work / "maddrs.txt").read_text().split()
        for i in range(2):
            env = dict(os.environ)
            args = ["-m", "convforever.peer.cli", "--initial-peers", *maddrs, "--run-id", RUN, "--coordinator", url,
                    "--model", "convnext_atto", "--depth", "4", "--image-size", "32", "--batch-size", "16",
                    "--target-batch-size", "256", "--max-steps", str(MAX_STEPS), "--matchmaking-time", "5", "--report-every", "1", "--num-workers", "0", "--threads", "1",
                    "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--min-peers", "2", "--exit-grace", "60", "--no-augment"]
            if i == 0:
                args += ["--token", tokens[0]]
            else:
                env["CONVFOREVER_TOKEN"] = tokens[1]
            peers.append(start(args, work / f"peer{i}.log", env=env))
        target = wait_for(r"can also join through: (/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)", work / "peer0.log",
                          [coordinator, *peers], 180).group(1)
        wait_for(r"can also join through", work / "peer1.log", [coordinator, *peers], 180)
        intruder = subprocess.run(
            [sys.executable, str(HERE / "intruder.py"), "--run-id", RUN, "--coordinator", url, "--initial-peers",
             *maddrs, "--target", target, "--token", stolen, "--out", str(work / "intruder.json")],
            capture_output=True, text=True, timeout=240)
        facts["intruder_log"] = intruder.stdout + intruder.stderr
        facts["seen"] = json.loads((work / "intruder.json").read_text()) if intruder.returncode == 0 else None
        facts["codes"] = [p.wait(timeout=600) for p in peers]
        # A peer with a bad token, and one with the revoked token: each exits at once, saying what to do.
        facts["refused"] = {name: subprocess.run(
            [sys.executable, "-m", "convforever.peer.cli", "--initial-peers", *maddrs, "--run-id", RUN,
             "--coordinator", url, "--token", value, "--model", "convnext_atto"],
            capture_output=True, text=True, timeout=120) for name, value in (("bad", bad_secret(tokens[0])), ("revoked", stolen))}
    finally:
        for proc in peers:
            if proc.poll() is None:
                proc.kill()
        coordinator.send_signal(2)
        try:
            coordinator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            coordinator.kill()
    facts["logs"] = {p.stem: p.read_text() for p in work.glob("*.log")}
    return facts


def test_intruder_is_refused_everywhere(run):
    seen = run["seen"]
    assert seen is not None, run["intruder_log"]
    assert seen["token"].startswith("refused:") and "revoked" in seen["token"], seen
    assert seen["lease"].startswith("HTTP 401") and "--token" in seen["lease"], seen
    assert seen["status"].startswith("HTTP 401") and "?token=" in seen["status"], seen
    assert seen["dht"].startswith("refused:") and "bootstrap failed" in seen["dht"], seen
    target_log = run["logs"]["peer0"]
    for attack, what in (("join", "join an averaging group"), ("aggregate", "send tensors for averaging"),
                         ("download", "download the state")):
        # Nothing came back: an error, or (hivemind's stream handler sometimes loses the error of a handler that
        # raises at once) an empty answer. What the intruder must never get is a message.
        answered = [s for s in seen[attack] if not s.startswith(("refused:", "ANSWERED 0 messages"))]
        assert seen[attack] and not answered, (attack, seen)
        # The handlers under the peers' real protocol names refused on access grounds, not for a wrong name: the
        # target says so in its log even when the error did not reach the intruder.
        assert f"refused to let {seen['peer_id']} {what}: no certificate of this run" in target_log, (attack, seen)
    assert any("private run" in s and "Only peers that joined with a join token" in s
               for attack in ("join", "aggregate", "download") for s in seen[attack]), seen


def test_honest_peers_train_and_average_in_pairs(run):
    logs = run["logs"]
    assert run["codes"] == [0, 0], logs
    for name in ("peer0", "peer1"):
        assert "joined private run" in logs[name]
        sizes = json.loads(re.search(r"all-reduce group sizes: (\{.*\})", logs[name]).group(1))
        steps = re.findall(r"^step (\d+) \|", logs[name], flags=re.M)
        assert int(steps[-1]) >= MAX_STEPS, logs[name]
        # Most steps in a pair: on a loaded 2-core box a round now and then times out (both peers and the intruder
        # start at once), and a step taken alone is hivemind's normal fallback, not the intruder's doing.
        assert sizes.get("2", 0) >= MAX_STEPS // 2, (name, sizes)


def test_both_peers_leased_shards_and_the_coordinator_checkpointed(run):
    db = sqlite3.connect(f"file:{run['work'] / 'ckpt' / 'leases.sqlite'}?mode=ro", uri=True)
    try:
        holders = {peer for (peer,) in db.execute("SELECT DISTINCT peer FROM leases")}
    finally:
        db.close()
    assert len(holders) == 2, run["logs"]["coordinator"]
    latest = run["work"] / "ckpt" / "latest"
    assert latest.is_file() and latest.read_text().startswith("step-"), run["logs"]["coordinator"]


def test_bad_and_revoked_tokens_exit_with_one_clear_line(run):
    bad, revoked = run["refused"]["bad"], run["refused"]["revoked"]
    assert bad.returncode != 0 and "unknown join token" in bad.stderr, bad.stderr[-2000:]
    assert revoked.returncode != 0 and "was revoked; ask the run's owner for a new token" in revoked.stderr, \
        revoked.stderr[-2000:]
