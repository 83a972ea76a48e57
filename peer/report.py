"""What a peer tells its user (the progress line) and the swarm (a metrics record in the DHT)."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from convforever.compression import TrafficSnapshot


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@dataclass
class ProgressWindow:
    """Loss and throughput since the previous report, plus running totals for the whole run."""

    started: float = field(default_factory=time.monotonic)
    window_start: float = field(default_factory=time.monotonic)
    loss_sum: float = 0.0
    loss_count: int = 0
    window_samples: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)

    def observe(self, loss: float, batch_size: int, skipped: dict[str, int]) -> None:
        self.loss_sum += loss * batch_size
        self.loss_count += batch_size
        self.window_samples += batch_size
        self.samples += batch_size
        self.skipped.update(skipped)

    def skip(self, skipped: dict[str, int]) -> None:
        """A batch that was read but not trained on (its loss was not finite): counted by reason, not as samples."""
        self.skipped.update(skipped)

    def close(self) -> tuple[float, float]:
        """Return (mean loss, samples/s) for the window and start a new one."""
        now = time.monotonic()
        loss = self.loss_sum / self.loss_count if self.loss_count else math.nan
        rate = self.window_samples / max(now - self.window_start, 1e-9)
        self.loss_sum, self.loss_count, self.window_samples, self.window_start = 0.0, 0, 0, now
        return loss, rate


class RecentRounds:
    """Per-round bytes and ratio over the latest report window that had an averaging round.

    A since-start average would hide what a peer sends now for hundreds of steps: PowerSGD's warm-up rounds
    (``--powersgd-warmup``) cost 8-bit's bytes, ~50x a PowerSGD round's.
    """

    def __init__(self) -> None:
        self.mark: Optional[TrafficSnapshot] = None  # the counters at the end of the latest window with a round
        self.latest: Optional[TrafficSnapshot] = None  # that window's traffic

    def update(self, traffic: TrafficSnapshot) -> Optional[TrafficSnapshot]:
        """Close a window at ``traffic`` (cumulative); return the latest window with a round (None: none yet)."""
        window = traffic if self.mark is None else traffic - self.mark
        if window.grad_rounds > 0:
            self.latest, self.mark = window, traffic
        return self.latest


def format_progress(
    step: int, loss: float, samples_per_second: float, peers: int, traffic: TrafficSnapshot,
    last_group_size: int, skipped: Counter, recent: Optional[TrafficSnapshot] = None,
) -> str:
    """The one line a volunteer watches: is it learning, how fast, with whom, at what network cost.

    ``traffic`` is since start (the totals); per-round figures come from ``recent`` (``RecentRounds``) if given.
    """
    per_round = recent if recent is not None and recent.grad_rounds else traffic
    skipped_text = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())) or "none"
    return " | ".join([
        f"step {step}",
        f"loss {loss:.4f}" if math.isfinite(loss) else "loss -",
        f"{samples_per_second:.1f} samples/s",
        f"peers {peers} (last group {last_group_size})",
        f"sent {human_bytes(traffic.grad_bytes_sent + traffic.state_bytes_sent)}"
        f" recv {human_bytes(traffic.grad_bytes_received + traffic.state_bytes_received)}",
        f"{human_bytes(per_round.bytes_per_round_sent)}/round, {per_round.ratio_vs_fp32:.0f}x vs fp32"
        if per_round.grad_rounds else "no averaging round yet",
        f"skipped {skipped_text}",
    ])
