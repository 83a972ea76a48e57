"""Small building blocks of ConvNeXt, written here so the project does not depend on timm.

Each layer keeps timm's attribute names and parameter shapes (``timm/layers/{norm,grn,mlp,drop}.py``),
because the state-dict keys of the whole model are a contract: checkpoints trained by the swarm must load
in timm, and timm checkpoints must load here.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch for a random subset of samples.

    The kept samples are scaled by ``1 / keep_prob`` so the expected output is unchanged and eval mode
    (where this is the identity) needs no rescaling. No parameters or buffers, so it never shows in the
    state dict.
    """

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # One draw per sample, broadcast over channels and space.
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(mask_shape).bernoulli_(keep_prob).div_(keep_prob)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last (channel) dimension of NHWC tensors; timm's default eps of 1e-6."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of NCHW tensors.

    Subclassing ``nn.LayerNorm`` keeps the parameters named ``weight``/``bias`` with shape (C,), as in timm.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """Global Response Normalization (ConvNeXt V2): boosts channels whose spatial energy stands out.

    ``weight``/``bias`` are 1-D (C,) as in timm's ``GlobalResponseNorm`` and its pretrained weights
    (timm's checkpoint filter reshapes the original (1, 1, 1, C) ``gamma``/``beta`` to (C,)). Both start at
    zero, so a fresh block behaves as if GRN were absent.
    """

    def __init__(self, dim: int, eps: float = 1e-6, channels_last: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.spatial_dim = (1, 2) if channels_last else (2, 3)
        self.channel_dim = -1 if channels_last else 1
        self.wb_shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_g = x.norm(p=2, dim=self.spatial_dim, keepdim=True)
        x_n = x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(self.wb_shape), self.weight.view(self.wb_shape), x * x_n)


class Mlp(nn.Module):
    """The block's inverted-bottleneck MLP: fc1 → GELU → (GRN for V2) → fc2.

    ``use_conv`` selects 1×1 ``Conv2d`` on NCHW input instead of ``Linear`` on NHWC input. timm builds the
    small presets (atto…nano) that way, and it changes the weight shapes ((out, in, 1, 1) instead of
    (out, in)), so it is part of each preset, not a speed knob. Attribute names match both timm's ``Mlp``
    and ``GlobalResponseNormMlp``; timm's dropouts are always zero in ConvNeXt and have no parameters.
    """

    def __init__(self, in_features: int, hidden_features: int, *, use_conv: bool, use_grn: bool) -> None:
        super().__init__()
        # Registration order fixes the state-dict and named_parameters() order: fc1, grn, fc2, as in timm.
        linear = partial(nn.Conv2d, kernel_size=1) if use_conv else nn.Linear
        self.fc1 = linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden_features, channels_last=not use_conv) if use_grn else nn.Identity()
        self.fc2 = linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.grn(self.act(self.fc1(x))))
