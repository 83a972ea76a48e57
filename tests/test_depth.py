"""Deep stacks (issue 7): checkpointing schemes give exact gradients and keep activation memory nearly flat in
depth, layer scale keeps a deep model near identity at init, drop path grows linearly over the blocks.

Memory is counted, never timed or read from the process: bytes of the tensors autograd saves (saved-tensor
hooks) and the exact peak of live tensor bytes during a step (a dispatch mode over every aten op), both
deterministic; bench/depth_memory.py measures the same on real sizes, with the process's RSS as well.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from convforever.model import ConvNeXt, ModelConfig, create_model
from convforever.model.convnext import NESTED_MIN_BLOCKS, checkpoint_blocks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from depth_memory import LiveTensorBytes, saved_bytes  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: OpenMP threads only add overhead, and on a busy machine spin-waiting makes each
    op take milliseconds. Restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(depth: int, **kwargs) -> ConvNeXt:
    """``depth`` blocks spread as ``stage_depths_for`` does, on narrow dims so hundreds of blocks are cheap."""
    torch.manual_seed(0)
    config = ModelConfig("atto", depth=depth)
    return ConvNeXt(num_classes=10, depths=config.depths, dims=(8, 16, 32, 64), conv_mlp=True, **kwargs).train()


def _grads(model: ConvNeXt, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same drop-path masks in every run
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])
def test_every_checkpointing_scheme_gives_the_gradients_of_none(drop_path_rate):
    model = create_model(ModelConfig("atto", depth=12, drop_path_rate=drop_path_rate, layer_scale_init_value=0.5))
    model.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    plain = _grads(model, x, y)
    for scheme in ("block", "nested", "auto"):
        model.set_grad_checkpointing(True, scheme)
        assert all(s.grad_checkpointing and s.checkpoint_scheme == scheme for s in model.stages)
        got = _grads(model, x, y)
        for name in plain:
            torch.testing.assert_close(got[name], plain[name], msg=f"{scheme}: {name}")
    model.set_grad_checkpointing(False)
    assert not any(s.grad_checkpointing for s in model.stages)


def test_nested_checkpointing_of_a_long_stage_is_exact_with_uneven_segments():
    # 37 blocks: segments of ceil(sqrt(37)) = 7, the last one 2 blocks long.
    torch.manual_seed(0)
    blocks = _tiny(4 * 37, drop_path_rate=0.2).stages[1].blocks
    x = torch.randn(2, 16, 4, 4, requires_grad=True)

    def grads(run) -> list[torch.Tensor]:
        x.grad = None
        blocks.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        run(x).square().sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in blocks.parameters()]

    plain = grads(blocks)
    nested = grads(lambda t: checkpoint_blocks(blocks, t, "nested"))
    for a, b in zip(plain, nested, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="scheme"):
        checkpoint_blocks(blocks, x, "every-other")
    with pytest.raises(ValueError, match="scheme"):
        create_model(ModelConfig("atto")).set_grad_checkpointing(True, "sqrt")


def test_checkpointing_is_skipped_without_grad_and_leaves_eval_outputs_alone():
    model = _tiny(16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.set_grad_checkpointing(True, "nested")
        torch.testing.assert_close(model(x), expected)


def _memory(depth: int, scheme: str | None) -> tuple[int, int]:
    """(bytes saved for backward at the end of the forward, peak live tensor bytes of forward + backward)."""
    model = _tiny(depth)
    if scheme is not None:
        model.set_grad_checkpointing(True, scheme)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    saved = saved_bytes(model, x, y)
    params = list(model.parameters())  # with their .grad now allocated: neither counts as activation memory
    with LiveTensorBytes(params + [p.grad for p in params]) as live:
        F.cross_entropy(model(x), y).backward()
    return saved, live.peak


def test_activation_memory_is_nearly_flat_in_depth_with_nested_checkpointing():
    # Depth 16 -> 128 (4 -> 32 blocks a stage). Measured: nested peak 111 -> 143 KB (1.3x), saved 62 -> 93 KB;
    # per-block checkpointing peak 126 -> 341 KB (2.7x), saved 77 -> 292 KB (3.8x): one input kept per block.
    nested_16, nested_128 = _memory(16, "nested"), _memory(128, "nested")
    block_16, block_128 = _memory(16, "block"), _memory(128, "block")
    assert nested_128[1] / nested_16[1] < 1.6, (nested_16, nested_128)
    assert nested_128[0] / nested_16[0] < 2.0, (nested_16, nested_128)
    assert block_128[1] / block_16[1] > 2.0, (block_16, block_128)  # the linear growth nesting removes
    assert block_128[0] / block_16[0] > 3.0, (block_16, block_128)
    assert nested_128[1] < block_128[1] / 2


def test_auto_scheme_nests_only_long_stages():
    assert 128 // 4 >= NESTED_MIN_BLOCKS > 27  # every preset stage (at most 27 blocks) stays per-block
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    for depth, expected in ((16, "block"), (128, "nested")):
        saved = {}
        for scheme in ("auto", expected):
            model = _tiny(depth)
            model.set_grad_checkpointing(True, scheme)
            saved[scheme] = saved_bytes(model, x, y)
        assert saved["auto"] == saved[expected], (depth, saved)


def test_activation_memory_grows_linearly_without_checkpointing():
    saved_16, peak_16 = _memory(16, None)
    saved_64, peak_64 = _memory(64, None)
    assert 3.0 < saved_64 / saved_16 < 4.5 and 3.0 < peak_64 / peak_16 < 4.5
    assert _memory(64, "nested")[1] < peak_64 / 5


def _stage_changes(model: ConvNeXt, x: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """Per stage, |blocks(h) - h| / |h| (how far the blocks move the residual stream), and the logits."""
    changes = []
    with torch.no_grad():
        h = model.stem(x)
        for stage in model.stages:
            h0 = stage.downsample(h)
            h = stage.blocks(h0)
            changes.append(((h - h0).norm() / h0.norm()).item())
        return changes, model.forward_head(h)


def test_deep_model_starts_near_identity_with_small_layer_scale():
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    deep = create_model(ModelConfig("atto", depth=64)).eval()  # layer_scale_init_value defaults to 1e-6
    assert ModelConfig("atto").layer_scale_init_value == 1e-6
    changes, logits = _stage_changes(deep, x)
    assert max(changes) < 1e-4, changes  # 16 blocks a stage move the stream by ~1e-6 of its size
    assert torch.isfinite(logits).all() and logits.std() < 1.0
    torch.manual_seed(0)
    shallow_logits = _stage_changes(create_model(ModelConfig("atto", depth=4)).eval(), x)[1]
    assert 0.5 < logits.std() / shallow_logits.std() < 2.0  # the output scale does not grow with depth
    # Layer scale 1.0, for contrast: the same depth moves the last stage's stream by about its own size.
    torch.manual_seed(0)
    unscaled = create_model(ModelConfig("atto", depth=64, layer_scale_init_value=1.0)).eval()
    assert _stage_changes(unscaled, x)[0][-1] > 0.3


def test_drop_path_rate_grows_linearly_from_zero_over_all_blocks_of_a_deep_model():
    depth, rate = 256, 0.2
    with torch.device("meta"):  # the schedule is plain floats; skip initialising 72M parameters
        model = create_model(ModelConfig("atto", depth=depth, drop_path_rate=rate))
    got = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    assert len(got) == depth
    assert got == pytest.approx(torch.linspace(0, rate, depth).tolist(), abs=1e-6)
    assert got[0] == 0.0 and got[-1] == pytest.approx(rate)
    # Across stage boundaries too: one schedule over the whole stack, not one per stage.
    steps = [b - a for a, b in zip(got[:-1], got[1:], strict=True)]
    assert max(steps) - min(steps) < 1e-6
    assert isinstance(model.stages[0].blocks[0].drop_path, torch.nn.Identity)  # rate 0: no module at all
