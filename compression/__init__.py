"""ConvForever compression: how gradients and training state travel between peers, and what it costs.

``build_averaging_kwargs(config, counters, params)`` gives hivemind.Optimizer its averagers and codecs;
``TrafficCounters.snapshot()`` tells the main process how many bytes they moved.
"""

from .codecs import gradient_codec, state_codec
from .config import MODES, STATE_MODES, CompressionConfig
from .counters import TrafficCounters, TrafficSnapshot, butterfly_bytes_sent, compression_ratio, fp32_bytes
from .factory import (
    CountingGradientAverager,
    CountingPowerSGDGradientAverager,
    GradientAveragerFactory,
    build_averaging_kwargs,
)

__all__ = [
    "MODES",
    "STATE_MODES",
    "CompressionConfig",
    "CountingGradientAverager",
    "CountingPowerSGDGradientAverager",
    "GradientAveragerFactory",
    "TrafficCounters",
    "TrafficSnapshot",
    "build_averaging_kwargs",
    "butterfly_bytes_sent",
    "compression_ratio",
    "fp32_bytes",
    "gradient_codec",
    "state_codec",
]
