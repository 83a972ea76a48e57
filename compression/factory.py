"""Building hivemind.Optimizer's averaging arguments from a CompressionConfig."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from hivemind.compression import NoCompression
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

from .codecs import gradient_codec, state_codec
from .config import CompressionConfig
from .counters import TrafficCounters, fp32_bytes
from .counting import CountingAveragerMixin, CountingCompression
from .flat import FlatPowerSGDGradientAverager
from .warmup import PowerSGDWarmupMixin

logger = logging.getLogger(__name__)

POWERSGD_Q_SEED = 0x5EED


class CountingGradientAverager(CountingAveragerMixin, GradientAverager):
    """hivemind's plain gradient averager (modes none / fp16 / 8bit), with traffic counting."""


class CountingPowerSGDGradientAverager(CountingAveragerMixin, PowerSGDWarmupMixin, PowerSGDGradientAverager):
    """hivemind's PowerSGD averager: rank-r P/Q factors with error feedback (``_ms``) and warm-started Q (``_qs``).

    Tensors it does not factorize (1-D, or saving < ``min_compression_ratio``) travel whole in the Q phase.
    Hands hivemind one tensor per factor (the ``per-tensor`` layout), which costs a message and codebook each.
    """


class CountingFlatPowerSGDGradientAverager(CountingAveragerMixin, PowerSGDWarmupMixin, FlatPowerSGDGradientAverager):
    """The same PowerSGD maths with each phase sent as flat buffers (the ``flat`` layout, see ``flat.py``)."""


@dataclass
class GradientAveragerFactory:
    """What hivemind.Optimizer calls as ``grad_averager_factory(**kwargs)``; adds the mode's class, rank and counters.

    The Optimizer passes ``compression=grad_compression``; we leave it, since build_averaging_kwargs supplies the
    codec of the same config.
    """

    config: CompressionConfig
    traffic: TrafficCounters

    def __call__(self, **kwargs: Any) -> GradientAverager:
        if not self.config.uses_powersgd:
            # hivemind.Optimizer has a joiner download the gradient averager's state too. PowerSGD's is its warm
            # start (the Q factors, small); a plain GradientAverager's is its averaged gradient buffers, a full
            # fp32 gradient that nothing applies: not worth serving.
            kwargs.setdefault("allow_state_sharing", False)
            return CountingGradientAverager(traffic=self.traffic, **kwargs)
        cls = CountingFlatPowerSGDGradientAverager if self.config.layout == "flat" else CountingPowerSGDGradientAverager
        averager = cls(averager_rank=self.config.rank, traffic=self.traffic, warmup_steps=self.config.warmup_steps,
                       **kwargs)
        _reseed_warm_start(averager)
        return averager


def _reseed_warm_start(averager: PowerSGDGradientAverager) -> None:
    """Replace hivemind's initial Q (``torch.rand``: all positive, drawn independently by each peer) with N(0, 1)
    drawn from a fixed seed.

    All-positive Q makes the columns of P = M Q nearly parallel; orthogonalizing them then amplifies any quantization
    error in P (measured on rank-4 means: 14-24% error with 8-bit P in the first rounds, 3-4% with Gaussian Q). A shared
    seed gives every peer the same Q, as the PowerSGD paper assumes. ``_qs`` live in shared memory, so the averager
    process (already forked, no round run yet) sees the new values.
    """
    generator = torch.Generator().manual_seed(POWERSGD_Q_SEED)
    with averager.get_tensors():
        for q in averager._qs:
            q.copy_(torch.randn(q.shape, generator=generator))


def build_averaging_kwargs(
    config: CompressionConfig, counters: TrafficCounters, params: Sequence[torch.Tensor]
) -> dict[str, Any]:
    """Keyword arguments for hivemind.Optimizer that make gradients and state travel as ``config`` says.

    Call in the main process before creating the Optimizer (which forks the averagers), with the parameters the
    Optimizer will average; ``counters`` then fills from the averager processes.

    Mind ``average_state_every``: its default of 1 sends every parameter (fp16 by default) every epoch, which costs
    far more than PowerSGD gradients; see bench/RESULTS.md.
    """
    params = list(params)
    counters.set_fp32_payload_bytes(fp32_bytes(params))
    grad_codec, state = gradient_codec(config), state_codec(config)
    logger.info("compression: mode=%s rank=%d grads=%r state=%r", config.mode, config.rank, grad_codec, state)
    return dict(
        grad_averager_factory=GradientAveragerFactory(config, counters),
        grad_compression=grad_codec,
        state_averaging_compression=CountingCompression(state, counters, "state_bytes_sent", "state_rounds"),
        # fp32: the download carries optimizer statistics that fp16 would flush to zero (see state_codec)
        load_state_compression=CountingCompression(NoCompression(), counters, "state_download_bytes_sent"),
    )
