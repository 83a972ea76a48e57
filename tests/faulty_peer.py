"""Faulty peers for the tests: the real ``convforever-peer`` with one thing broken.

    python tests/faulty_peer.py KIND -- <convforever-peer flags>

Attackers (test_poisoning.py), which also switch their own guard off so that, as reducers, they average the poison
into what they send back and honest peers meet it from both sides of the all-reduce:
  ``nan``     every gradient is NaN;
  ``ascent``  -1e6 times the true gradient (a step on it, however clipped or normalised, raises the loss).
  Both serve their state to joiners like any peer: honest peers must refuse it (Peer.check_downloaded_state).
  ``future-epoch``  no training at all: a DHT node whose signed progress record claims epoch 10**6, as a
                    peer would that wants every honest one to believe it is behind and reload its state.
A broken honest peer (test_peer.py):
  ``nan-loss``  every other forward pass returns NaN logits, as an fp16 overflow or a bad kernel would.
A peer that loses power (test_faults.py):
  ``die-mid-round``  trains honestly until, in a gradient all-reduce, the first averaged delta comes back from a
                     groupmate (proof that the groupmate holds our part, and that the round is under way for every
                     member), then SIGKILLs its whole process group from inside the averager process: the main
                     process, the DHT and averager children and the p2p daemon die at once, nothing is closed or
                     said goodbye to. Environment: ``FAULTY_DIE_ROUND`` (default 1), die in this gradient round or
                     a later one; ``FAULTY_DIE_GROUP`` (default 2), only in a round with at least this many peers;
                     ``FAULTY_MARKER``, a file to write (JSON: time, round, group, the part counts so far) just
                     before the kill. The peer makes itself a process group leader first, so the kill never
                     reaches whoever started it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from itertools import count

import torch

from convforever.compression import guard
from convforever.peer import cli, trainer

ATTACKS = {"nan": lambda grad: torch.full_like(grad, math.nan), "ascent": lambda grad: grad * -1e6}


def break_peer(peer: trainer.Peer, kind: str) -> None:
    if kind in ATTACKS:
        for param in peer.model.parameters():
            param.register_hook(ATTACKS[kind])
    else:
        honest_forward, calls = peer.forward, count()
        peer.forward = lambda images: honest_forward(images) * (math.nan if next(calls) % 2 else 1.0)


def phase_of(group_id: bytes) -> str:
    """Which all-reduce of a gradient round: PowerSGD's P or Q factors (a warm-up round's whole gradients travel
    under the P phase's id), or the gradients whole (no PowerSGD)."""
    return next((name for name in ("PHASE_P", "PHASE_Q") if group_id.endswith(name.encode())), "whole")


def die_mid_round() -> None:
    """Arm the ``die-mid-round`` kill (module docstring); call before the averagers fork, they inherit the patch."""
    from convforever.compression import counting

    first_round, min_group = int(os.environ.get("FAULTY_DIE_ROUND", "1")), int(os.environ.get("FAULTY_DIE_GROUP", "2"))
    marker = os.environ.get("FAULTY_MARKER")
    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)  # our own group: killpg below must take this peer and its children, never our parent
    group_leader = os.getpid()
    current = {"round": 0, "group_id": None, "group": ()}  # per process: only the gradient averager's child counts

    # Rounds are counted where every gradient all-reduce begins, whatever averager class runs it (whole gradients,
    # PowerSGD's two phases under one group id plus a suffix, or a PowerSGD warm-up round): a new group id is a new
    # round.
    honest_init = counting.CountingAllReduceRunner.__init__

    def counted_init(self, **kwargs) -> None:
        honest_init(self, **kwargs)
        group_id = self.group_id.removesuffix(b"PHASE_P").removesuffix(b"PHASE_Q")
        if group_id != current["group_id"]:
            current.update(round=current["round"] + 1, group_id=group_id,
                           group=tuple(str(peer) for peer in self.ordered_peer_ids))

    honest_delta = counting.CountingAllReduceRunner._register_checked_delta

    def dying_delta(self, peer_index: int, part_index: int, delta) -> None:
        reducer = self.ordered_peer_ids[peer_index]
        if reducer != self.peer_id and current["round"] >= first_round and len(current["group"]) >= min_group:
            traffic = self.traffic.snapshot()
            facts = dict(time=time.time(), pid=os.getpid(), peer_id=str(self.peer_id), round=current["round"],
                         group=list(current["group"]), phase=phase_of(self.group_id),
                         delta_from=str(reducer), part_index=part_index, parts_sent=traffic.grad_parts_sent,
                         parts_received=traffic.grad_parts_received, completed_rounds=traffic.grad_rounds)
            print(f"die-mid-round: SIGKILL to process group {group_leader} now: {json.dumps(facts)}", flush=True)
            if marker:
                with open(marker, "w") as f:
                    json.dump(facts, f)
                    f.flush()
                    os.fsync(f.fileno())
            os.killpg(group_leader, signal.SIGKILL)
        honest_delta(self, peer_index, part_index, delta)

    counting.CountingAllReduceRunner.__init__ = counted_init
    counting.CountingAllReduceRunner._register_checked_delta = dying_delta


def claim_future_epoch(argv: list[str]) -> None:
    import argparse

    import hivemind
    from hivemind.optim.progress_tracker import ProgressTracker

    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--target-batch-size", type=int, default=128)
    args, _ = parser.parse_known_args(argv)
    dht = hivemind.DHT(initial_peers=args.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    tracker = ProgressTracker(dht, args.run_id, args.target_batch_size, start=True)
    print(f"claiming epoch 10**6 as peer {dht.peer_id}", flush=True)
    while True:
        tracker.report_local_progress(10**6, samples_accumulated=args.target_batch_size // 2)
        time.sleep(1.0)


def main() -> None:
    kind, argv = sys.argv[1], [arg for arg in sys.argv[2:] if arg != "--"]
    if kind == "future-epoch":
        return claim_future_epoch(argv)
    if kind == "die-mid-round":
        die_mid_round()
        return cli.main(argv)
    if kind not in (*ATTACKS, "nan-loss"):
        raise SystemExit(f"faulty_peer.py: unknown kind {kind!r}; choose nan, ascent, future-epoch, nan-loss or "
                         "die-mid-round")
    if kind in ATTACKS:
        guard.rejection_reason = lambda *args: None  # before the averagers fork: they inherit it
    honest_init = trainer.Peer.__init__

    def broken_init(self: trainer.Peer, config) -> None:
        honest_init(self, config)
        break_peer(self, kind)

    trainer.Peer.__init__ = broken_init
    cli.main(argv)


if __name__ == "__main__":
    main()
