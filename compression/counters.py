"""Byte accounting for averaging traffic: shared-memory counters and the pure maths around them.

hivemind runs every averager as a forked child process, so the counters are one ``multiprocessing.Array`` created in
the main process before the fork; the children add to it, the main process reads consistent snapshots.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import torch

FP32_BYTES = 4


def fp32_bytes(params: Iterable[torch.Tensor]) -> int:
    """Size of one fp32 copy of these tensors: the payload a plain fp32 all-reduce moves per round in a pair."""
    return sum(FP32_BYTES * p.numel() for p in params)


def butterfly_bytes_sent(payload_bytes: int, peer_fractions: Sequence[float], own_index: int, num_senders: int,
                         own_is_sender: bool = True) -> int:
    """Bytes one peer sends in hivemind's butterfly all-reduce of ``payload_bytes`` (received is the same amount).

    As a sender a peer ships every part it does not reduce itself, ``payload * (1 - own_share)``; as a reducer it
    returns its share, averaged, to each other sender, ``payload * own_share * other_senders``. For n equal peers that
    is ``2 (n - 1) / n * payload``: exactly one payload for a pair, approaching two in large groups.
    """
    total = float(sum(peer_fractions))
    own_share = peer_fractions[own_index] / total if total > 0 else 0.0
    as_sender = payload_bytes * (1.0 - own_share) if own_is_sender else 0.0
    other_senders = num_senders - (1 if own_is_sender else 0)
    as_reducer = payload_bytes * own_share * other_senders
    return round(as_sender + as_reducer)


def compression_ratio(fp32_bytes_per_round: float, bytes_sent: int, rounds: int) -> float:
    """How many times fewer bytes were sent per round than fp32 would have; NaN until something was sent."""
    if rounds <= 0 or bytes_sent <= 0:
        return math.nan
    return fp32_bytes_per_round / (bytes_sent / rounds)


@dataclass(frozen=True)
class TrafficSnapshot:
    """Counters at one moment, as seen from the main process. Subtract two snapshots to get one interval.

    ``*_bytes_*`` are protobuf-encoded message sizes (payload plus per-part headers), ``*_payload_*`` only the codec's
    buffers; ``grad_fp32_reference_bytes`` is what fp32 would have sent over the same completed rounds and groups.
    State fields cover only the sender half of state averaging (see ``counting.CountingCompression``).
    """

    grad_bytes_sent: int = 0
    grad_bytes_received: int = 0
    grad_rounds: int = 0
    state_bytes_sent: int = 0
    state_bytes_received: int = 0
    state_rounds: int = 0
    fp32_bytes_per_round: int = 0
    grad_payload_bytes_sent: int = 0
    grad_payload_bytes_received: int = 0
    grad_parts_sent: int = 0
    grad_parts_received: int = 0
    grad_fp32_reference_bytes: int = 0
    state_download_bytes_sent: int = 0

    @property
    def bytes_per_round_sent(self) -> float:
        """Gradient bytes this peer sent per completed round (NaN before the first round)."""
        return self.grad_bytes_sent / self.grad_rounds if self.grad_rounds else math.nan

    @property
    def bytes_per_round_received(self) -> float:
        return self.grad_bytes_received / self.grad_rounds if self.grad_rounds else math.nan

    @property
    def ratio_vs_fp32(self) -> float:
        return compression_ratio(self.fp32_bytes_per_round, self.grad_bytes_sent, self.grad_rounds)

    def __sub__(self, earlier: TrafficSnapshot) -> TrafficSnapshot:
        delta = {f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)}
        delta["fp32_bytes_per_round"] = _fp32_per_round(
            delta["grad_fp32_reference_bytes"], delta["grad_rounds"], self.fp32_bytes_per_round
        )
        return TrafficSnapshot(**delta)


def _fp32_per_round(reference_bytes: int, rounds: int, default: int) -> int:
    """Average fp32 reference over measured rounds; before any round, the static pair estimate."""
    return reference_bytes // rounds if rounds > 0 else default


# slots in the shared array: every TrafficSnapshot field except the derived fp32_bytes_per_round, plus the static
# fp32 size that stands in for it before the first round
_SLOTS = tuple(f.name for f in fields(TrafficSnapshot) if f.name != "fp32_bytes_per_round") + ("fp32_payload_bytes",)
_INDEX = {name: i for i, name in enumerate(_SLOTS)}


class TrafficCounters:
    """Shared-memory traffic counters. Create in the main process before hivemind starts its averager processes."""

    def __init__(self) -> None:
        self._values = mp.Array("q", len(_SLOTS), lock=True)

    def add(self, **deltas: int) -> None:
        """Atomically add to named counters (any TrafficSnapshot field but fp32_bytes_per_round)."""
        with self._values.get_lock():
            for name, value in deltas.items():
                self._values[_INDEX[name]] += int(value)

    def set_fp32_payload_bytes(self, value: int) -> None:
        """Record the fp32 size of the averaged gradients, the fp32 reference until a round is measured."""
        with self._values.get_lock():
            self._values[_INDEX["fp32_payload_bytes"]] = int(value)

    def snapshot(self) -> TrafficSnapshot:
        with self._values.get_lock():
            values = dict(zip(_SLOTS, self._values[:], strict=True))
        default = values.pop("fp32_payload_bytes")
        per_round = _fp32_per_round(values["grad_fp32_reference_bytes"], values["grad_rounds"], default)
        return TrafficSnapshot(fp32_bytes_per_round=per_round, **values)
