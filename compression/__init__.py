"""ConvForever compression: how gradients and training state travel between peers, and what it costs.

``build_averaging_kwargs(config, counters, params)`` gives hivemind.Optimizer its averagers and codecs;
``TrafficCounters.snapshot()`` tells the main process how many bytes they moved.
"""

from .codecs import SegmentCompression, gradient_codec, state_codec
from .config import LAYOUTS, MODES, STATE_MODES, WHOLE_CODECS, CompressionConfig
from .counters import TrafficCounters, TrafficSnapshot, butterfly_bytes_sent, compression_ratio, fp32_bytes
from .factory import (
    CountingFlatPowerSGDGradientAverager,
    CountingGradientAverager,
    CountingPowerSGDGradientAverager,
    GradientAveragerFactory,
    build_averaging_kwargs,
)
from .flat import cut_at_pivots

__all__ = [
    "LAYOUTS",
    "MODES",
    "STATE_MODES",
    "CompressionConfig",
    "CountingFlatPowerSGDGradientAverager",
    "CountingGradientAverager",
    "CountingPowerSGDGradientAverager",
    "GradientAveragerFactory",
    "SegmentCompression",
    "TrafficCounters",
    "TrafficSnapshot",
    "WHOLE_CODECS",
    "build_averaging_kwargs",
    "butterfly_bytes_sent",
    "compression_ratio",
    "cut_at_pivots",
    "fp32_bytes",
    "gradient_codec",
    "state_codec",
]
