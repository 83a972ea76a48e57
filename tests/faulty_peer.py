"""Faulty peers for the tests: the real ``convforever-peer`` with one thing broken.

    python tests/faulty_peer.py KIND -- <convforever-peer flags>

Attackers (test_poisoning.py), which also switch their own guard off so that, as reducers, they average the poison
into what they send back and honest peers meet it from both sides of the all-reduce:
  ``nan``     every gradient is NaN;
  ``ascent``  -1e6 times the true gradient (a step on it, however clipped or normalised, raises the loss).
  ``future-epoch``  no training at all: a DHT node whose signed progress record claims epoch 10**6, as a
                    peer would that wants every honest one to believe it is behind and reload its state.
A broken honest peer (test_peer.py):
  ``nan-loss``  every other forward pass returns NaN logits, as an fp16 overflow or a bad kernel would.
"""

from __future__ import annotations

import math
import sys
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


def claim_future_epoch(argv: list[str]) -> None:
    import argparse
    import time

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
    if kind not in (*ATTACKS, "nan-loss"):
        raise SystemExit(f"faulty_peer.py: unknown kind {kind!r}; choose nan, ascent, future-epoch or nan-loss")
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
