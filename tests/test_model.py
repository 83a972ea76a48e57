"""Tests for convforever.model: timm state-dict compatibility, presets, depth mapping, training helpers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from convforever.model import (
    MODEL_NAMES,
    ConvNeXt,
    ModelConfig,
    create_model,
    flat_parameter_names,
    param_groups,
    stage_depths_for,
)
from convforever.model.layers import DropPath

Shapes = list[tuple[str, tuple[int, ...]]]


def _timm_convnext_atto_state_dict() -> Shapes:
    """convnext_atto's state dict (keys, shapes, order) as timm builds it, written from timm's source.

    timm/models/convnext.py: ``convnext_atto`` = ``dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320),
    conv_mlp=True)``, ls_init_value=1e-6, num_classes=1000. conv_mlp=True makes the block norm LayerNorm2d
    and mlp.fc1/fc2 1×1 Conv2d. Within a block the block's own ``gamma`` comes before its children.
    Deliberately independent of our PRESETS.
    """
    dims, depths = (40, 80, 160, 320), (2, 2, 6, 2)
    keys: Shapes = [
        ("stem.0.weight", (40, 3, 4, 4)),
        ("stem.0.bias", (40,)),
        ("stem.1.weight", (40,)),
        ("stem.1.bias", (40,)),
    ]
    for i, (c, depth) in enumerate(zip(dims, depths)):
        if i > 0:
            p = f"stages.{i}.downsample"
            keys += [
                (f"{p}.0.weight", (dims[i - 1],)),
                (f"{p}.0.bias", (dims[i - 1],)),
                (f"{p}.1.weight", (c, dims[i - 1], 2, 2)),
                (f"{p}.1.bias", (c,)),
            ]
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}"
            keys += [
                (f"{p}.gamma", (c,)),
                (f"{p}.conv_dw.weight", (c, 1, 7, 7)),
                (f"{p}.conv_dw.bias", (c,)),
                (f"{p}.norm.weight", (c,)),
                (f"{p}.norm.bias", (c,)),
                (f"{p}.mlp.fc1.weight", (4 * c, c, 1, 1)),
                (f"{p}.mlp.fc1.bias", (4 * c,)),
                (f"{p}.mlp.fc2.weight", (c, 4 * c, 1, 1)),
                (f"{p}.mlp.fc2.bias", (c,)),
            ]
    keys += [
        ("head.norm.weight", (320,)),
        ("head.norm.bias", (320,)),
        ("head.fc.weight", (1000, 320)),
        ("head.fc.bias", (1000,)),
    ]
    return keys


def _state_dict_shapes(model: nn.Module) -> Shapes:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _small(name: str = "convnext_atto", **overrides) -> ConvNeXt:
    """A 4-block model: every code path of a preset at a fraction of the cost."""
    return create_model(ModelConfig(name, depth=4, **overrides))


# --- timm compatibility ------------------------------------------------------------------------------


def test_convnext_atto_state_dict_matches_timm_exactly():
    model = create_model(ModelConfig("convnext_atto", num_classes=1000))
    expected = _timm_convnext_atto_state_dict()
    assert len(expected) == 128
    assert _state_dict_shapes(model) == expected
    assert list(model.buffers()) == []


def test_convnextv2_atto_has_grn_and_no_layer_scale():
    shapes = dict(_state_dict_shapes(create_model(ModelConfig("convnextv2_atto", num_classes=1000))))
    assert shapes["stages.0.blocks.0.mlp.grn.weight"] == (160,)
    assert shapes["stages.0.blocks.0.mlp.grn.bias"] == (160,)
    assert shapes["stages.3.blocks.1.mlp.grn.weight"] == (1280,)
    assert shapes["stages.0.blocks.0.mlp.fc1.weight"] == (160, 40, 1, 1)
    assert not any(k.endswith("gamma") for k in shapes)
    # V1 keys + 2 GRN tensors - 1 gamma per block.
    assert len(shapes) == 128 + 12


def test_convnext_tiny_shapes_and_param_count():
    model = create_model(ModelConfig("convnext_tiny", num_classes=1000))
    shapes = dict(_state_dict_shapes(model))
    assert shapes["stem.0.weight"] == (96, 3, 4, 4)
    assert shapes["stages.0.blocks.0.conv_dw.weight"] == (96, 1, 7, 7)
    assert shapes["stages.0.blocks.0.mlp.fc1.weight"] == (384, 96)  # Linear: no conv_mlp for tiny
    assert shapes["stages.2.blocks.8.mlp.fc2.weight"] == (384, 1536)
    assert shapes["stages.3.downsample.1.weight"] == (768, 384, 2, 2)
    assert shapes["head.fc.weight"] == (1000, 768)
    assert "stages.0.downsample.0.weight" not in shapes
    assert sum(p.numel() for p in model.parameters()) == 28_589_128  # timm: 28.59M


# timm's published parameter counts (millions, 1000 classes).
PUBLISHED_PARAMS_M = {
    "convnext_atto": 3.70,
    "convnext_femto": 5.22,
    "convnext_pico": 9.05,
    "convnext_nano": 15.59,
    "convnext_tiny": 28.59,
    "convnext_small": 50.22,
    "convnext_base": 88.59,
    "convnextv2_atto": 3.71,
    "convnextv2_femto": 5.23,
    "convnextv2_pico": 9.07,
    "convnextv2_nano": 15.62,
    "convnextv2_tiny": 28.64,
    "convnextv2_small": 50.32,
    "convnextv2_base": 88.72,
}


def test_every_preset_matches_timm_published_param_count():
    assert set(PUBLISHED_PARAMS_M) == set(MODEL_NAMES)
    for name, millions in PUBLISHED_PARAMS_M.items():
        with torch.device("meta"):  # shapes only, no memory or init cost
            model = create_model(ModelConfig(name, num_classes=1000))
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions, name


def test_conv_mlp_and_linear_mlp_compute_the_same_function():
    """The NCHW (1×1 conv, channels-first GRN) and NHWC (Linear, channels-last GRN) paths agree."""
    torch.manual_seed(0)
    kwargs = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5, use_grn=True, ls_init_value=None)
    conv, linear = ConvNeXt(conv_mlp=True, **kwargs), ConvNeXt(conv_mlp=False, **kwargs)
    state = conv.state_dict()
    for k, v in state.items():
        if "grn" in k:
            state[k] = torch.randn_like(v)  # GRN starts at zero; make it matter
    conv.load_state_dict(state)
    linear_shapes = linear.state_dict()
    linear.load_state_dict({k: v.reshape(linear_shapes[k].shape) for k, v in state.items()})
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(conv(x), linear(x), rtol=1e-4, atol=1e-5)


def test_init_follows_timm():
    model = create_model(ModelConfig("convnextv2_atto"))
    block = model.stages[0].blocks[0]
    assert torch.all(block.mlp.grn.weight == 0) and torch.all(block.mlp.grn.bias == 0)
    assert torch.all(model.stages[3].downsample[1].bias == 0)
    assert torch.all(model.stem[1].weight == 1)
    w = model.stages[2].blocks[0].mlp.fc1.weight
    assert 0.015 < w.std().item() < 0.025 and w.abs().max().item() <= 2.0
    v1 = create_model(ModelConfig("convnext_atto"))
    assert torch.all(v1.stages[1].blocks[1].gamma == 1e-6)


# --- forward -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnext_tiny", "convnextv2_tiny"])
def test_forward_shapes(name):
    model = _small(name)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 50)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features, 2, 2)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)


def test_num_classes_and_in_chans_are_configurable():
    model = _small(num_classes=7, in_chans=1)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 7)


# --- config, presets, depth mapping ------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth, expected",
    [(16, (4, 4, 4, 4)), (30, (8, 8, 7, 7)), (5, (2, 1, 1, 1)), (4, (1, 1, 1, 1)), (7, (2, 2, 2, 1))],
)
def test_stage_depths_for(depth, expected):
    assert stage_depths_for(depth) == expected


@pytest.mark.parametrize("depth", [0, 3, -1])
def test_depth_below_four_is_rejected_with_a_clear_message(depth):
    with pytest.raises(ValueError, match=r"depth must be >= 4"):
        stage_depths_for(depth)
    with pytest.raises(ValueError, match=r"depth must be >= 4"):
        ModelConfig(depth=depth)


def test_depth_override_builds_that_many_blocks():
    config = ModelConfig("convnext_atto", depth=30)
    assert config.depths == (8, 8, 7, 7)
    model = create_model(config)
    assert [len(stage.blocks) for stage in model.stages] == [8, 8, 7, 7]
    assert ModelConfig("convnext_tiny").depths == (3, 3, 9, 3)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model name") as info:
        ModelConfig("convnext_giant")
    for name in MODEL_NAMES:
        assert name in str(info.value)


def test_names_aliases_and_derived_properties():
    assert len(MODEL_NAMES) == 14
    assert ModelConfig("tiny").name == "convnext_tiny"
    assert ModelConfig("Base").name == "convnext_base"
    v2 = ModelConfig("convnextv2_nano")
    assert (v2.version, v2.depths, v2.dims) == (2, (2, 2, 8, 2), (80, 160, 320, 640))
    assert ModelConfig().name == "convnext_atto" and ModelConfig().num_classes == 50


def test_config_round_trips_through_json():
    config = ModelConfig("small", depth=16, drop_path_rate=0.1, num_classes=10)
    d = json.loads(json.dumps(config.to_dict()))
    assert d["name"] == "convnext_small" and d["depths"] == [4, 4, 4, 4] and d["version"] == 1
    assert ModelConfig.from_dict(d) == config


def test_from_dict_rejects_mismatched_derived_keys_and_unknown_keys():
    d = ModelConfig("atto").to_dict()
    with pytest.raises(ValueError, match="depths"):
        ModelConfig.from_dict({**d, "depths": [1, 1, 1, 1]})
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**d, "widht": 3})


def test_create_model_keeps_config():
    config = ModelConfig("femto", depth=4)
    assert create_model(config).config is config


# --- training helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_tiny"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = _small(name, drop_path_rate=0.3, layer_scale_init_value=0.5)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 50, (4,))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same drop-path masks in both runs
        nn.functional.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    checkpointed = grads()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], msg=n)


def test_drop_path_is_identity_in_eval_and_per_sample_in_train():
    x = torch.randn(64, 3, 4, 4)
    drop = DropPath(0.5).eval()
    assert drop(x) is x
    drop.train()
    out = drop(x)
    kept = (out != 0).flatten(1).any(dim=1)
    assert 0 < kept.sum() < 64
    torch.testing.assert_close(out[kept], x[kept] * 2)

    model = _small(drop_path_rate=0.5).eval()
    img = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(img), model(img))


def test_drop_path_rate_grows_linearly_over_blocks():
    model = create_model(ModelConfig("atto", depth=5, drop_path_rate=0.4))
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_param_groups_cover_every_parameter_once_in_named_order():
    model = _small("convnextv2_atto")
    groups = param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len({id(p) for p in flat}) == len(list(model.parameters()))
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert all(p.ndim == 1 for p in groups[1]["params"])

    name_of = {id(p): n for n, p in model.named_parameters()}
    names = flat_parameter_names(model)
    assert names == [name_of[id(p)] for p in flat]
    order = list(name_of.values())
    for group in groups:  # each group keeps named_parameters() order
        positions = [order.index(name_of[id(p)]) for p in group["params"]]
        assert positions == sorted(positions)
    no_decay = set(names[len(groups[0]["params"]) :])
    assert "stages.0.blocks.0.mlp.grn.weight" in no_decay and "head.norm.bias" in no_decay
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


def test_param_groups_no_decay_includes_layer_scale():
    model = _small("convnext_atto")
    names = flat_parameter_names(model)
    decay = param_groups(model, 0.1)[0]["params"]
    assert "stages.0.blocks.0.gamma" in names[len(decay) :]
    assert "stages.0.blocks.0.conv_dw.weight" in names[: len(decay)]
