"""Which hivemind codec each mode puts on the wire.

Only hivemind's registered codecs may be used: the receiving peer decodes every part by the codec enum in the
message (``deserialize_torch_tensor``), and a reducer encodes its reply with that same enum, so a custom codec
would be unreadable on the other side.
"""

from __future__ import annotations

from hivemind.compression import (
    BlockwiseQuantization,
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    ScaledFloat16Compression,
    SizeAdaptiveCompression,
)
from hivemind.compression.adaptive import AdaptiveCompressionBase

from .config import CompressionConfig

FACTORS, WHOLE = "factors", "whole"  # segment names of the flat PowerSGD layout, first element of each part's key


class SegmentCompression(AdaptiveCompressionBase):
    """Picks the codec of a flat-layout part by its segment: P/Q factors or the tensors PowerSGD leaves whole.

    A sender-side choice only: each message carries the chosen codec's enum, the receiver decodes by it and the
    reducer encodes its reply with the same enum, so the wire holds nothing but hivemind's registered codecs. Parts
    without a segment key (the per-tensor layout, plain averagers) get the factor codec.
    """

    def __init__(self, factors: CompressionBase, whole: CompressionBase) -> None:
        self.factors, self.whole = factors, whole

    def choose_compression(self, info: CompressionInfo) -> CompressionBase:
        segment = info.key[0] if isinstance(info.key, tuple) and info.key else None
        return self.whole if segment == WHOLE else self.factors

    def __repr__(self) -> str:
        return f"SegmentCompression(factors={self.factors!r}, whole={self.whole!r})"


def _eight_bit(min_8bit_numel: int, small: CompressionBase) -> CompressionBase:
    """Blockwise 8-bit (bitsandbytes, absmax per 4096 values) for big tensors, ``small`` below the threshold.

    Blockwise rather than hivemind's Uniform8Bit: gradients are heavy-tailed, and Uniform8Bit clips everything beyond
    3 sigma into its edge buckets, while blockwise scales each block by its own absmax. Both carry a 1 KiB codebook.
    """
    # import now, in the main process: hivemind imports bitsandbytes lazily inside the forked averager, which then
    # spends seconds of its first all-reduce on it (and a missing package would only show up mid-round)
    import bitsandbytes.functional  # noqa: F401

    return SizeAdaptiveCompression(threshold=min_8bit_numel, less=small, greater_equal=BlockwiseQuantization())


def gradient_codec(config: CompressionConfig) -> CompressionBase:
    """Codec for gradient parts (and, under PowerSGD, for P/Q factors and the tensors PowerSGD leaves uncompressed).

    fp16 for gradients is mean/std-scaled (8 bytes per part more than plain fp16): gradient entries of 1e-6..1e-4
    would otherwise land in fp16's subnormal range and lose most of their digits. Under the flat PowerSGD layout,
    ``powersgd-8bit`` returns a ``SegmentCompression``: 8-bit factors, ``config.whole_codec`` for the whole tensors.
    """
    if config.mode in ("none", "powersgd"):
        return NoCompression()
    if config.mode == "fp16":
        return ScaledFloat16Compression()
    eight_bit = _eight_bit(config.min_8bit_numel, small=ScaledFloat16Compression())
    if config.mode == "8bit" or config.layout == "per-tensor":
        return eight_bit
    whole = ScaledFloat16Compression() if config.whole_codec == "fp16" else eight_bit
    return SegmentCompression(factors=eight_bit, whole=whole)


def state_codec(config: CompressionConfig) -> CompressionBase:
    """Codec for periodic state averaging (parameters only): they are O(1e-2..1), so plain fp16 keeps ~3 digits.

    Never use it for the state *download*, which also carries Adam's statistics: exp_avg_sq is ~g**2
    (1e-10 and below), which fp16 flushes to zero while exp_avg survives, and the next AdamW step then
    divides by eps alone and throws weights to +-100 (seen in the 2-peer swarm test).
    """
    if config.state_compression == "none":
        return NoCompression()
    if config.state_compression == "fp16":
        return Float16Compression()
    return _eight_bit(config.min_8bit_numel, small=Float16Compression())
