"""ConvNeXt V1 / V2, laid out like timm's ``timm/models/convnext.py`` so state dicts are interchangeable.

Papers: "A ConvNet for the 2020s" (arXiv:2201.03545) and "ConvNeXt V2" (arXiv:2301.00808).

Only the configuration ConvForever uses is implemented (patch stem, 7×7 kernels, output stride 32,
LayerNorm, pool → norm → fc head). State-dict keys, shapes and even their order match timm:
``stem.{0,1}``, ``stages.N.downsample.{0,1}`` (N = 1..3), ``stages.N.blocks.M.{gamma, conv_dw, norm,
mlp.fc1, mlp.grn, mlp.fc2}``, ``head.{norm,fc}``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .layers import DropPath, LayerNorm, LayerNorm2d, Mlp

logger = logging.getLogger(__name__)

# How ``set_grad_checkpointing`` recomputes a stage (see ``checkpoint_blocks``); "auto" picks per stage.
CHECKPOINT_SCHEMES = ("auto", "block", "nested")
# "auto" nests from this many blocks in a stage on: below it, the block inputs that per-block checkpointing keeps
# are small next to the working set of one recomputed block, and nesting's extra forward pass would cost more
# than it saves. Every timm preset (at most 27 blocks a stage) stays per-block; --depth 128 and up nests.
NESTED_MIN_BLOCKS = 32


def _run_checkpointed(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x


def checkpoint_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, scheme: str = "auto") -> torch.Tensor:
    """Run ``blocks`` in order with their activations recomputed in backward; the memory/compute trade-off:

    - ``block``: checkpoint every block. Backward keeps one input per block (N of them, each B×C×H×W) plus the
      full activations of the one block being recomputed (~12 such tensors for ConvNeXt's 4× MLP): memory
      still grows linearly with depth, at ~1/12 of the slope without checkpointing. Costs one extra forward.
    - ``nested``: checkpoint segments of ceil(sqrt(N)) blocks, and inside a segment every block again. Forward
      keeps only the segment inputs (~sqrt(N)); backward recomputes one segment at a time, keeping its ~sqrt(N)
      block inputs plus one block's activations: ~2·sqrt(N) + 12 tensors instead of N + 12. Costs two extra
      forwards (segment, then block) instead of one: about 25% more step time than ``block``.
    - ``auto``: ``nested`` for stages of at least ``NESTED_MIN_BLOCKS`` blocks, ``block`` below.

    Non-reentrant checkpointing (nesting supported) stashes and restores the RNG state at each checkpoint, so
    drop path draws the same masks on recompute and the gradients equal those without checkpointing.
    """
    if scheme not in CHECKPOINT_SCHEMES:
        raise ValueError(f"checkpointing scheme {scheme!r}: choose one of {', '.join(CHECKPOINT_SCHEMES)}")
    blocks = list(blocks)
    n = len(blocks)
    if scheme == "block" or (scheme == "auto" and n < NESTED_MIN_BLOCKS) or n < 2:
        return _run_checkpointed(blocks, x)
    size = math.ceil(math.sqrt(n))
    for start in range(0, n, size):
        x = checkpoint(_run_checkpointed, blocks[start : start + size], x, use_reentrant=False)
    return x


class Stem(nn.Sequential):
    """Non-overlapping 4×4 patchify conv then LayerNorm2d; a Sequential so the keys are ``stem.0`` / ``stem.1``."""

    def __init__(self, in_chans: int, out_chs: int, patch_size: int = 4) -> None:
        super().__init__(
            nn.Conv2d(in_chans, out_chs, kernel_size=patch_size, stride=patch_size),
            LayerNorm2d(out_chs),
        )


class Downsample(nn.Sequential):
    """LayerNorm2d then 2×2 stride-2 conv between stages; keys ``downsample.0`` (norm), ``downsample.1`` (conv)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__(
            LayerNorm2d(in_chs),
            nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2),
        )


class ConvNeXtBlock(nn.Module):
    """7×7 depthwise conv → LayerNorm → 4× MLP (GELU, GRN for V2) → layer scale → drop path, plus residual.

    With ``conv_mlp`` everything stays NCHW (LayerNorm2d, 1×1 convs); otherwise the block permutes to NHWC
    for LayerNorm and Linear, as the original implementation does. Which one a preset uses is fixed by timm
    because it changes the MLP weight shapes.
    """

    def __init__(
        self,
        dim: int,
        *,
        ls_init_value: float | None,
        conv_mlp: bool,
        use_grn: bool,
        drop_path: float = 0.0,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.use_conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim) if conv_mlp else LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim, use_conv=conv_mlp, use_grn=use_grn)
        # V2 passes None: no layer scale, and no `gamma` key in the state dict.
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(x) + shortcut


class ConvNeXtStage(nn.Module):
    """Optional downsample, then ``depth`` blocks at one resolution.

    ``grad_checkpointing`` is per stage (switched for all by ``ConvNeXt.set_grad_checkpointing``): block
    activations are recomputed in backward, trading compute for memory; ``checkpoint_scheme`` says how
    (``checkpoint_blocks``).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        depth: int,
        downsample: bool,
        drop_path_rates: Sequence[float],
        ls_init_value: float | None,
        conv_mlp: bool,
        use_grn: bool,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.checkpoint_scheme = "auto"
        self.downsample = Downsample(in_chs, out_chs) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *(
                ConvNeXtBlock(
                    out_chs,
                    ls_init_value=ls_init_value,
                    conv_mlp=conv_mlp,
                    use_grn=use_grn,
                    drop_path=drop_path_rates[i],
                )
                for i in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_blocks(self.blocks, x, self.checkpoint_scheme)
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """Global average pool → LayerNorm → Linear (timm's ``NormMlpClassifierHead`` without hidden layer)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.norm = LayerNorm2d(in_features)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.flatten(self.norm(self.global_pool(x)))
        return x if pre_logits else self.fc(x)


class ConvNeXt(nn.Module):
    """ConvNeXt backbone + classifier; build it from a ``ModelConfig`` with ``create_model``.

    ``forward_features`` (NCHW feature map) and ``forward_head`` are separate so evaluation and feature
    extraction reuse them. ``config`` is set by ``create_model`` so checkpoints can store it.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        ls_init_value: float | None = 1e-6,
        conv_mlp: bool = False,
        use_grn: bool = False,
        drop_path_rate: float = 0.0,
        head_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} must have the same length")
        self.config: ModelConfig | None = None
        self.num_classes = num_classes
        self.num_features = dims[-1]

        self.stem = Stem(in_chans, dims[0])
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last (as timm).
        # device="cpu" so building under a meta-device context still yields plain floats.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        self.stages = nn.Sequential(
            *(
                ConvNeXtStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depth=depths[i],
                    downsample=i > 0,
                    drop_path_rates=rates[i].tolist(),
                    ls_init_value=ls_init_value,
                    conv_mlp=conv_mlp,
                    use_grn=use_grn,
                )
                for i in range(len(depths))
            )
        )
        self.head = ClassifierHead(dims[-1], num_classes)
        self._init_weights(head_init_scale)

    def _init_weights(self, head_init_scale: float) -> None:
        """timm's init: truncated normal (std .02) conv/linear weights, zero biases, scaled classifier.

        Norms start at (1, 0), GRN at 0 and layer scale at ``ls_init_value`` from their constructors.
        """
        for name, module in self.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Linear) and name.startswith("head."):
                    with torch.no_grad():
                        module.weight.mul_(head_init_scale)
                        module.bias.mul_(head_init_scale)

    def set_grad_checkpointing(self, enable: bool = True, scheme: str = "auto") -> None:
        """Recompute block activations in backward to fit larger batches or deeper models in memory.

        ``scheme`` (``checkpoint_blocks``): ``"block"`` checkpoints each block (memory still linear in depth),
        ``"nested"`` segments of ~sqrt(N) blocks and each block inside (~sqrt(N) memory, one more forward),
        ``"auto"`` nests only stages of ``NESTED_MIN_BLOCKS`` blocks or more. timm's signature is the first argument.
        """
        if scheme not in CHECKPOINT_SCHEMES:
            raise ValueError(f"checkpointing scheme {scheme!r}: choose one of {', '.join(CHECKPOINT_SCHEMES)}")
        for stage in self.stages:
            stage.grad_checkpointing = enable
            stage.checkpoint_scheme = scheme

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_model(config: ModelConfig) -> ConvNeXt:
    """Build the model a ``ModelConfig`` describes; the config is kept on ``model.config``."""
    model = ConvNeXt(
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        depths=config.depths,
        dims=config.dims,
        ls_init_value=config.layer_scale_init_value if config.version == 1 else None,
        conv_mlp=config.conv_mlp,
        use_grn=config.version == 2,
        drop_path_rate=config.drop_path_rate,
    )
    model.config = config
    logger.debug(
        "built %s depths=%s dims=%s (%d parameters)",
        config.name,
        config.depths,
        config.dims,
        sum(p.numel() for p in model.parameters()),
    )
    return model
