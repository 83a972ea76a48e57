"""How gradients and training state are compressed on the wire: one dataclass, validated where it is built."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("none", "fp16", "8bit", "powersgd", "powersgd-8bit")
STATE_MODES = ("none", "fp16", "8bit")
LAYOUTS = ("flat", "per-tensor")
WHOLE_CODECS = ("fp16", "8bit")


@dataclass
class CompressionConfig:
    """Gradient and state compression for one peer; every peer of a run must use the same settings.

    :param mode: how gradients travel in the all-reduce. ``powersgd*`` trade accuracy per step for ~100x less
      traffic (error feedback repays the difference over the next steps); ``8bit`` quantizes tensors of at least
      ``min_8bit_numel`` values blockwise and sends the rest as scaled fp16.
    :param rank: PowerSGD rank. Traffic grows linearly with it; 1-4 is the usual range for a slow network,
      raise it if loss lags behind a ``none`` run with the same batch size.
    :param state_compression: how periodic state averaging and state download travel. ``fp16`` halves the cost
      and is safe for parameters; ``8bit`` perturbs parameters by ~1% of each block's max on every averaging round.
    :param min_8bit_numel: tensors (and PowerSGD factors) smaller than this go as fp16, because each 8-bit message
      carries ~1 KiB of codebook, which costs more than it saves below ~1k values.
    :param layout: how PowerSGD hands its tensors to hivemind's all-reduce. ``flat`` concatenates all P factors
      into one buffer, and all Q factors and the tensors PowerSGD leaves whole into another, cut once per peer: one
      codebook and one message per peer, phase and segment instead of one per tensor (~5 parts per round instead of
      241 for ConvNeXt-T in a pair; 0.454 instead of 0.566 MB at rank 4 with 8-bit factors, see bench/RESULTS.md).
      ``per-tensor`` is hivemind's own scheme and the default: under ``flat`` the 8-bit blocks (4096 values, one
      absmax) mix small factors with large ones, and the two peers of tests/test_swarm.py ended 0.55-0.75 of the
      distance training moved them apart, against 0.01-0.30 per tensor. Peers with different layouts cannot
      average with each other.
    :param warmup_steps: under PowerSGD, the first global steps average whole gradients (with the mode's
      whole-tensor codec, 8-bit blockwise under ``powersgd-8bit``) before PowerSGD takes over, as PyTorch's PowerSGD
      hook does (``start_powerSGD_iter``); see ``warmup.py``. 10, the recipe's LR warm-up, took rank 4 from 1.3-4.8
      points below the single-process baseline on the MNIST parity bench to 0.4 below its mean (bench/RESULTS.md); the
      warm-up rounds cost 8-bit's bytes (~4x less than fp32 instead of ~200x), which a long run does not notice.
    :param whole_codec: under ``powersgd-8bit`` with the flat layout, how the tensors PowerSGD does not factorize
      (biases, norms, layer scales: ~65k values in ConvNeXt-T) travel. Unlike the factors they get no error
      feedback, so whatever the codec loses is lost for good: ``fp16`` (scaled) loses ~1e-3, ``8bit`` ~1e-2 and
      halves their cost.
    """

    mode: str = "powersgd-8bit"
    rank: int = 4
    state_compression: str = "fp16"
    min_8bit_numel: int = 2048
    layout: str = "per-tensor"  # flat makes peers' averaged gradients disagree more (see layout above)
    whole_codec: str = "fp16"
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown --compression {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.state_compression not in STATE_MODES:
            raise ValueError(
                f"unknown --state-compression {self.state_compression!r}; choose one of: {', '.join(STATE_MODES)}"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"--powersgd-rank must be an integer >= 1, got {self.rank!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown PowerSGD layout {self.layout!r}; choose one of: {', '.join(LAYOUTS)}")
        if self.whole_codec not in WHOLE_CODECS:
            raise ValueError(f"unknown whole-tensor codec {self.whole_codec!r}; choose one of: {', '.join(WHOLE_CODECS)}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"--powersgd-warmup must be an integer >= 0, got {self.warmup_steps!r}")
        if self.min_8bit_numel < 0:
            raise ValueError(f"min_8bit_numel must be >= 0, got {self.min_8bit_numel!r}")

    @property
    def uses_powersgd(self) -> bool:
        return self.mode.startswith("powersgd")
