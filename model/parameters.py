"""Optimizer parameter groups, and the flat parameter order the coordinator relies on."""

from __future__ import annotations

from typing import Any

from torch import nn


def _split_named_parameters(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(decay, no_decay) lists, each in ``model.named_parameters()`` order.

    Weights with ndim >= 2 (convs, linears) decay; 1-D tensors (biases, norm affine, layer-scale ``gamma``,
    GRN ``weight``/``bias``) do not, because shrinking them towards zero changes what the layer computes
    rather than regularising it.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 else no_decay).append((name, param))
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: ``[{decay params, weight_decay}, {no-decay params, 0.0}]``.

    CONTRACT: the order is fixed — group 0 then group 1, and inside each group ``model.named_parameters()``
    order. The coordinator maps hivemind's flat optimizer-state tensors back to parameters by flattening
    these groups in exactly this order (names: ``flat_parameter_names``). Changing the split rule or the
    order makes existing swarm state unreadable. Every parameter appears exactly once, trainable or not,
    so the flat layout depends only on the architecture. Both groups are always present, even if empty.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay = _split_named_parameters(model)
    return [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]


def flat_parameter_names(model: nn.Module) -> list[str]:
    """Parameter names in the flattened order of ``param_groups`` (see its contract)."""
    decay, no_decay = _split_named_parameters(model)
    return [name for name, _ in decay + no_decay]
