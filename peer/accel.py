"""Making a consumer GPU's local step fast and lean: precision, memory layout, compilation, optimizer choice.

Everything here changes how the local forward/backward runs, never what the swarm computes: the averaged
gradient and the optimizer step are the same whatever a peer picks, so peers with different cards can
mix settings freely.

- bf16 autocast where the card supports it (Ampere and newer): no loss scaling needed;
- fp16 autocast elsewhere, with hivemind's own `GradScaler`, which only unscales and updates the scale
  around the swarm's global step (a plain torch GradScaler would act on every local micro-step and
  corrupt the accumulated gradients);
- channels_last memory format, which cuDNN's convolutions prefer for ConvNeXt's depthwise 7x7;
- `torch.compile` of the model, optional because the first steps pay minutes of compilation;
- 8-bit AdamW from bitsandbytes: optimizer statistics in 8 bits, ~6 bytes/parameter less.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class Precision:
    """The resolved choice: an autocast dtype (None: plain fp32) and whether loss scaling is needed."""

    dtype: Optional[torch.dtype]
    scaled: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto``: bf16 on GPUs that support it, fp16 with loss scaling on older ones, fp32 on the CPU."""
    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            raise ValueError(f"--precision {name} needs a CUDA device; on the CPU use --precision fp32 (or auto)")
        return Precision(None, scaled=False)
    if name == "auto":
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU has no bf16 support; use --precision fp16")
    return Precision({"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name], scaled=name == "fp16")


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def grad_scaler(precision: Precision):
    """hivemind's GradScaler for fp16 (see the module docstring), None otherwise."""
    if not precision.scaled:
        return None
    from hivemind import GradScaler

    return GradScaler()


def prepare_model(model: torch.nn.Module, device: torch.device, *, channels_last: bool, compile: bool,
                  checkpointing: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Move and lay out the model; return the callable to run forward with (compiled or the model itself).

    The optimizer must hold the original module's parameters (torch.compile shares them), and checkpoints
    store the original module's state dict, so the module itself is never replaced.
    """
    if checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        logger.info("compiling the model with torch.compile (the first steps are slow)")
        return torch.compile(model)
    return model


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # a broken CUDA setup makes bitsandbytes fail at import
            raise ValueError(f"--optimizer adamw8bit needs bitsandbytes, which did not import ({e}); "
                             "use --optimizer adamw") from None
        return bnb.optim.AdamW8bit
    return torch.optim.AdamW
