"""The training recipe (peer/recipe.py): schedule, clipping, EMA, blur and LeRaC, and clipping under hivemind."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convforever.model import ModelConfig, create_model, flat_parameter_names, param_groups
from convforever.peer.recipe import (
    ClippedAdamW,
    LrLambda,
    RecipeConfig,
    WeightEMA,
    add_recipe_arguments,
    blur_batch,
    blur_count,
    blur_fraction,
    blur_sigma,
    build_optimizer_setup,
    clipped,
    ema_decay,
    gaussian_blur,
    lerac_lambdas,
    lerac_levels,
    lerac_param_groups,
    lr_factor,
    recipe_from_args,
)


def tiny_convnext() -> nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(name="convnext_atto", depth=4, num_classes=10))


# ---- 1. schedule -------------------------------------------------------------------------------------------------


def test_lr_factor_warmup_cosine_and_floor():
    warmup, total, floor = 10, 110, 0.01
    assert lr_factor(0, warmup, total, floor) == pytest.approx(0.1)  # warm-up starts near 0, not at 0
    assert lr_factor(9, warmup, total, floor) == pytest.approx(1.0)  # and reaches the peak at its last step
    assert lr_factor(10, warmup, total, floor) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(60, warmup, total, floor) == pytest.approx((1 + floor) / 2)  # cosine midpoint
    assert lr_factor(110, warmup, total, floor) == pytest.approx(floor)
    assert lr_factor(500, warmup, total, floor) == pytest.approx(floor)  # stays at min_lr past total_steps
    values = [lr_factor(s, warmup, total, floor) for s in range(200)]
    assert all(a <= b for a, b in zip(values[:10], values[1:11], strict=True))  # rises during warm-up
    assert all(a >= b for a, b in zip(values[10:-1], values[11:], strict=True))  # never rises after


def test_lr_factor_without_total_steps_is_the_old_warmup():
    for warmup in (0, 1, 4, 10):
        assert [lr_factor(s, warmup) for s in range(15)] == [min(1.0, (s + 1) / max(warmup, 1)) for s in range(15)]


def test_recipe_validation_names_the_flag():
    cases = [(dict(total_steps=5, warmup_steps=10), "--total-steps"), (dict(min_lr=1.0, total_steps=100), "--min-lr"),
             (dict(max_grad_norm=-1.0), "--clip-grad"), (dict(ema_decay=1.0), "--ema-decay"),
             (dict(blur_fraction_start=1.5), "--blur-fraction-start"), (dict(blur_steps=-1), "--blur-steps"),
             (dict(lerac=True, lerac_steps=0), "--lerac-steps"), (dict(lerac_granularity="x"), "--lerac-gran")]
    for kwargs, flag in cases:
        with pytest.raises(ValueError, match=flag):
            RecipeConfig(**kwargs)
    d = RecipeConfig()  # the ConvNeXt recipe's values
    assert d.betas == (0.9, 0.999) and d.weight_decay == 0.05 and d.max_grad_norm == 5.0
    assert d.ema and d.ema_decay == 0.9999 and d.blur_steps == 0 and not d.lerac
    assert RecipeConfig(max_grad_norm=0).max_grad_norm is None  # --clip-grad 0 switches clipping off


def test_recipe_flags_round_trip():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=10)
    add_recipe_arguments(parser)
    assert recipe_from_args(parser.parse_args([])) == RecipeConfig()
    config = recipe_from_args(parser.parse_args(
        ["--total-steps", "1000", "--clip-grad", "0", "--no-ema", "--blur-steps", "50", "--blur-fraction-start", "0.5",
         "--lerac", "--lerac-granularity", "stage", "--betas", "0.9", "0.95"]))
    assert config.total_steps == 1000 and config.max_grad_norm is None and not config.ema and config.blur_steps == 50
    assert config.blur_fraction_start == 0.5 and config.lerac and config.lerac_granularity == "stage"
    assert config.betas == (0.9, 0.95)


# ---- 2. clipping -------------------------------------------------------------------------------------------------


def two_params(grads: list[list[float]]) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.tensor(g)
    return params


def test_clipping_scales_a_large_gradient_to_the_max_norm_and_records_the_norm():
    params = two_params([[3.0, 4.0], [0.0, 12.0]])  # global norm 13
    opt = clipped(torch.optim.SGD)(params, lr=1.0, max_grad_norm=5.0)
    opt.step()
    assert opt.last_grad_norm == pytest.approx(13.0) and opt.clipped_steps == 1
    after = torch.cat([p.grad for p in params])
    assert torch.linalg.vector_norm(after).item() == pytest.approx(5.0, rel=1e-5)
    # SGD applied the clipped gradient: p = 0 - 1.0 * g * 5 / 13
    assert torch.allclose(torch.cat([p.detach() for p in params]), -torch.tensor([3.0, 4.0, 0.0, 12.0]) * 5 / 13)


def test_clipping_leaves_a_small_gradient_alone_and_can_only_measure():
    params = two_params([[0.3, 0.4]])
    opt = clipped(torch.optim.SGD)(params, lr=1.0, max_grad_norm=5.0)
    opt.step()
    assert opt.last_grad_norm == pytest.approx(0.5) and opt.clipped_steps == 0
    assert torch.equal(params[0].grad, torch.tensor([0.3, 0.4]))
    params = two_params([[30.0, 40.0]])
    opt = clipped(torch.optim.SGD)(params, lr=1.0, max_grad_norm=None)
    opt.step()
    assert opt.last_grad_norm == pytest.approx(50.0) and torch.equal(params[0].grad, torch.tensor([30.0, 40.0]))


def test_nonfinite_gradient_skips_the_step():
    params = two_params([[float("nan"), 1.0]])
    opt = ClippedAdamW(params, lr=0.1)
    opt.step()
    assert opt.skipped_steps == 1 and math.isnan(opt.last_grad_norm)
    assert torch.equal(params[0].detach(), torch.zeros(2)) and not opt.state  # no update, no statistics


def test_clipped_adamw_sees_the_clipped_gradient():
    params = two_params([[3.0, 4.0], [0.0, 12.0]])
    opt = ClippedAdamW(params, lr=0.1, betas=(0.9, 0.999), weight_decay=0.0)
    assert isinstance(opt, torch.optim.AdamW) and opt.max_grad_norm == 5.0
    opt.step()
    exp_avg = torch.cat([opt.state[p]["exp_avg"] for p in params])
    assert torch.allclose(exp_avg, 0.1 * torch.tensor([3.0, 4.0, 0.0, 12.0]) * 5 / 13, atol=1e-6)


def test_clipping_composes_with_bitsandbytes_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(8192))  # above bitsandbytes' 4096-element threshold: 8-bit statistics
    param.grad = torch.randn(8192) * 100
    norm = torch.linalg.vector_norm(param.grad).item()
    before = param.detach().clone()
    try:
        opt = clipped(bnb.optim.AdamW8bit)([param], lr=1e-3, max_grad_norm=5.0)
        opt.step()
    except (RuntimeError, NotImplementedError) as e:  # a bitsandbytes build without CPU kernels
        pytest.skip(f"bitsandbytes AdamW8bit does not run here: {e}")
    assert isinstance(opt, bnb.optim.AdamW8bit) and type(opt).__name__ == "ClippedAdamW8bit"
    assert opt.last_grad_norm == pytest.approx(norm, rel=1e-4)
    assert torch.linalg.vector_norm(param.grad).item() == pytest.approx(5.0, rel=1e-4)
    assert opt.state[param]["state1"].dtype == torch.uint8 and not torch.equal(param.detach(), before)


# ---- 3. EMA ------------------------------------------------------------------------------------------------------


def test_ema_update_math_after_two_steps():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightEMA(model, decay=0.5, warmup=False)
    model.weight.data.fill_(2.0)
    assert ema.on_global_step(model, 1)  # 0.5 * 1 + 0.5 * 2
    assert not ema.on_global_step(model, 1)  # same global step: no second update
    model.weight.data.fill_(4.0)
    ema.on_global_step(model, 2)  # 0.5 * 1.5 + 0.5 * 4
    assert ema.state_dict()["weight"].item() == pytest.approx(2.75)
    assert list(ema.state_dict()) == list(model.state_dict()) and ema.updates == 2


def test_ema_warmup_decay():
    assert ema_decay(1, 0.9999) == pytest.approx(2 / 11)
    assert ema_decay(90, 0.9999) == pytest.approx(91 / 100)
    assert ema_decay(10**6, 0.9999) == 0.9999 and ema_decay(1, 0.9999, warmup=False) == 0.9999
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightEMA(model, decay=0.9999, warmup=True)
    model.weight.data.fill_(2.0)
    ema.on_global_step(model, 1)
    assert ema.state_dict()["weight"].item() == pytest.approx(2 / 11 * 1 + 9 / 11 * 2)


def test_ema_restarts_at_downloaded_weights_and_copies_to_a_model():
    model = tiny_convnext()
    ema = WeightEMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.on_global_step(model, 57)  # a jump: hivemind loaded the swarm's state
    assert ema.step == 57
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in model.state_dict().items())
    shared = WeightEMA(model, decay=0.9, warmup=False, reset_on_jump=False)
    tensors = shared.flat_tensors(flat_parameter_names(model))
    assert [t.shape for t in tensors] == [dict(model.named_parameters())[n].shape for n in flat_parameter_names(model)]
    other = tiny_convnext()
    ema.copy_to(other)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values(), strict=True))


# ---- 4. blur -----------------------------------------------------------------------------------------------------


def test_blur_sigma_and_fraction_by_step():
    config = RecipeConfig(blur_steps=100, blur_sigma=2.0)
    assert [blur_sigma(s, config) for s in (0, 50, 100, 1000)] == [2.0, 1.0, 0.0, 0.0]
    assert [blur_fraction(s, config) for s in (0, 99, 100)] == [1.0, 1.0, 0.0]
    config = RecipeConfig(blur_steps=100, blur_sigma=2.0, blur_fraction_start=0.5)
    assert [blur_fraction(s, config) for s in (0, 50, 100)] == [0.5, 0.25, 0.0]
    assert blur_sigma(0, RecipeConfig()) == 0.0  # off by default


def test_zero_sigma_is_the_identity():
    images = torch.randn(4, 3, 16, 16)
    assert blur_batch(images, 100, RecipeConfig(blur_steps=100)) is images
    assert blur_batch(images, 0, RecipeConfig()) is images
    assert gaussian_blur(images, 0.0) is images


def test_blurred_impulse_sums_to_one_with_variance_sigma_squared():
    sigma, size = 2.0, 41
    image = torch.zeros(1, 3, size, size)
    image[:, :, size // 2, size // 2] = 1.0
    out = gaussian_blur(image, sigma)
    assert out.shape == image.shape
    assert torch.allclose(out.sum(dim=(2, 3)), torch.ones(1, 3), atol=1e-5)
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    plane = out[0, 0]
    assert (plane.sum(1) * coords).sum().item() == pytest.approx(0.0, abs=1e-5)  # centred
    assert (plane.sum(1) * coords**2).sum().item() == pytest.approx(sigma**2, rel=0.01)  # rows
    assert (plane.sum(0) * coords**2).sum().item() == pytest.approx(sigma**2, rel=0.01)  # columns
    flat = torch.full((2, 3, 8, 8), 0.7)  # reflect padding keeps a flat image flat, even at the borders
    assert torch.allclose(gaussian_blur(flat, 3.0), flat, atol=1e-6)


def test_blur_batch_blurs_the_scheduled_fraction():
    config = RecipeConfig(blur_steps=100, blur_sigma=1.5, blur_fraction_start=0.5)
    images = torch.randn(64, 3, 16, 16)
    generator = torch.Generator().manual_seed(0)
    for step, expected in [(0, 32), (50, 16), (100, 0)]:
        out = blur_batch(images, step, config, generator)
        changed = (out - images).flatten(1).abs().amax(1) > 1e-6
        assert changed.sum().item() == expected
    out = blur_batch(images, 0, RecipeConfig(blur_steps=100, blur_sigma=1.5), generator)
    assert torch.allclose(out, gaussian_blur(images, 1.5))  # no fraction: the whole batch
    counts = [blur_count(0.25, 3, generator) for _ in range(2000)]  # 25% of 3 images: 0 or 1, 0.75 on average
    assert set(counts) == {0, 1} and sum(counts) / len(counts) == pytest.approx(0.75, abs=0.04)
    assert blur_count(0.5, 64, generator) == 32 and blur_count(1.0, 5, generator) == 5


# ---- 5. LeRaC ----------------------------------------------------------------------------------------------------


def test_lerac_levels_follow_the_depth():
    model = tiny_convnext()  # depths (1, 1, 1, 1)
    levels = lerac_levels(model, "block")
    assert levels["stem.0.weight"] == 0 and levels["stages.0.blocks.0.conv_dw.weight"] == 1
    assert levels["stages.1.downsample.1.weight"] == levels["stages.1.blocks.0.gamma"] == 2
    assert levels["head.fc.weight"] == 5
    stages = lerac_levels(model, "stage")
    assert stages["stem.1.bias"] == 0 and stages["stages.3.blocks.0.gamma"] == 4 and stages["head.fc.bias"] == 5
    deep = create_model(ModelConfig(name="convnext_atto", depth=8, num_classes=10))  # depths (2, 2, 2, 2)
    assert lerac_levels(deep, "block")["stages.1.blocks.1.mlp.fc1.weight"] == 4
    assert lerac_levels(deep, "stage")["stages.1.blocks.1.mlp.fc1.weight"] == 2


def test_lerac_groups_keep_the_flat_parameter_order():
    model = tiny_convnext()
    for granularity in ("block", "stage"):
        groups = lerac_param_groups(model, 0.05, 1e-3, 10.0, 1e-7, granularity)
        flat = [p for g in groups for p in g["params"]]
        plain = [p for g in param_groups(model, 0.05) for p in g["params"]]
        assert len(flat) == len(plain) and all(a is b for a, b in zip(flat, plain, strict=True))
        names = {id(p): n for n, p in model.named_parameters()}
        assert [names[id(p)] for p in flat] == flat_parameter_names(model)
        decayed = {id(p) for p in param_groups(model, 0.05)[0]["params"]}
        assert all((id(p) in decayed) == (g["weight_decay"] == 0.05) for g in groups for p in g["params"])


def test_lerac_rates_start_lower_with_depth_and_meet_at_lerac_steps():
    model = tiny_convnext()
    base, factor, eta_min, steps = 1e-3, 10.0, 2e-6, 100
    groups = lerac_param_groups(model, 0.05, base, factor, eta_min)
    levels, names = lerac_levels(model), {id(p): n for n, p in model.named_parameters()}
    level_of = [levels[names[id(g["params"][0])]] for g in groups]
    for group, level in zip(groups, level_of, strict=True):
        assert group["lr"] == pytest.approx(max(base * factor**-level, eta_min))
    assert groups[0]["lr"] == base and min(g["lr"] for g in groups) == pytest.approx(eta_min)  # floored
    lambdas = lerac_lambdas(groups, base, steps, warmup_steps=0)
    opt = torch.optim.AdamW(groups, lr=base)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambdas)
    at_start = [g["lr"] for g in opt.param_groups]
    assert at_start == pytest.approx([g["lr"] for g in groups])
    by_level = {level: lr for level, lr in zip(level_of, at_start, strict=True)}
    ordered = [by_level[level] for level in sorted(by_level)]
    assert all(a >= b for a, b in zip(ordered[:-1], ordered[1:], strict=True))  # deeper starts lower
    for _ in range(steps // 2):
        opt.step()  # no gradients: a no-op, called only so LambdaLR sees the usual order
        scheduler.step()
    halfway = [g["lr"] for g in opt.param_groups]  # geometric: sqrt(start * base)
    assert halfway == pytest.approx([math.sqrt(lr * base) for lr in at_start])
    for _ in range(steps - steps // 2):
        opt.step()
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([base] * len(groups))
    opt.step()
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([base] * len(groups))


def test_lerac_combines_with_the_cosine_schedule():
    fn = LrLambda(warmup_steps=10, total_steps=110, min_lr_ratio=0.0, start_ratio=1e-2, lerac_steps=20)
    # LambdaLR multiplies the group's initial lr (start_ratio * base): the effective ratio to base is
    assert fn(0) * 1e-2 == pytest.approx(lr_factor(0, 10, 110) * 1e-2)
    assert fn(10) * 1e-2 == pytest.approx(lr_factor(10, 10, 110) * 1e-1)
    assert fn(60) * 1e-2 == pytest.approx(lr_factor(60, 10, 110))


def test_setup_without_lerac_uses_the_plain_groups():
    model = tiny_convnext()
    setup = build_optimizer_setup(model, RecipeConfig(total_steps=100))
    assert len(setup.params) == 2 and [g["weight_decay"] for g in setup.params] == [0.05, 0.0]
    opt = setup.optimizer(setup.params)
    assert type(opt).__name__ == "ClippedAdamW" and opt.max_grad_norm == 5.0
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    lerac = build_optimizer_setup(model, RecipeConfig(lerac=True))
    assert len(lerac.params) == len(lerac.lambdas) > 2


# ---- hivemind integration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload", [False, True])
def test_hivemind_applies_the_clipped_averaged_gradient_on_schedule(offload):
    """One real hivemind.Optimizer, alone, target batch = batch: every step() is a global step.

    A huge loss scale makes the averaged gradient's norm far above 5; the parameters must move exactly as a
    plain AdamW fed the *clipped* gradient at lr * lr_factor(global step) would move them.
    """
    hivemind = pytest.importorskip("hivemind")
    model = tiny_convnext()
    config = RecipeConfig(lr=1e-2, warmup_steps=2, total_steps=6, min_lr=1e-4, max_grad_norm=5.0, ema=False)
    setup = build_optimizer_setup(model, config)
    names = flat_parameter_names(model)
    params = dict(model.named_parameters())
    # The reference: plain AdamW on copies, in hivemind's flat order, with the same zero-gradient first step
    # hivemind takes to create the optimizer statistics.
    reference = {n: params[n].detach().clone().requires_grad_() for n in names}
    ref_groups = [{"params": [reference[n] for n in names[:len(setup.params[0]["params"])]], "weight_decay": 0.05},
                  {"params": [reference[n] for n in names[len(setup.params[0]["params"]):]], "weight_decay": 0.0}]
    ref_opt = torch.optim.AdamW(ref_groups, lr=config.lr, betas=config.betas, eps=config.eps)
    for p in reference.values():
        p.grad = torch.zeros_like(p)
    ref_opt.step()

    ema = WeightEMA(model, decay=0.5, warmup=False, reset_on_jump=False)  # shared as hivemind extra_tensors
    dht = hivemind.DHT(start=True)
    opt = None
    try:
        opt = hivemind.Optimizer(
            dht=dht, run_id=f"recipe_{int(offload)}", params=setup.params, optimizer=setup.optimizer,
            scheduler=setup.scheduler, batch_size_per_step=4, target_batch_size=4, offload_optimizer=offload,
            extra_tensors=ema.flat_tensors(names), matchmaking_time=1.0, averager_opts=dict(request_timeout=0.5),
            verbose=False,
        )
        torch.manual_seed(1)
        images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        for step in range(3):
            assert opt.local_epoch == step
            (F.cross_entropy(model(images), labels) * 1e4).backward()
            grads = {n: params[n].grad.detach().clone() for n in names}
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
            expected_ema = {n: 0.5 * ema.state_dict()[n] for n in names}
            opt.step()
            opt.zero_grad()
            assert opt.local_epoch == step + 1  # a global step happened
            assert ema.on_global_step(model, opt.local_epoch)
            for n in names:
                assert torch.allclose(ema.state_dict()[n], expected_ema[n] + 0.5 * params[n].detach(), atol=1e-6)
            assert norm > 5 and opt.opt.last_grad_norm == pytest.approx(norm, rel=1e-4)
            for group in ref_opt.param_groups:
                group["lr"] = config.lr * lr_factor(step, config.warmup_steps, config.total_steps, config.min_lr_ratio)
            for n in names:
                reference[n].grad = grads[n] * (5.0 / (norm + 1e-6))
            ref_opt.step()
            for n in names:
                assert torch.allclose(params[n].detach(), reference[n].detach(), rtol=1e-4, atol=1e-6), (step, n)
            expected_lr = config.lr * lr_factor(step + 1, config.warmup_steps, config.total_steps, config.min_lr_ratio)
            assert [g["lr"] for g in opt.opt.param_groups] == pytest.approx([expected_lr] * 2)
        # What a peer serves (to newcomers and to the coordinator): parameters, then the EMA, both in flat order.
        _, served, _ = opt.state_averager.get_current_state()
        assert all(torch.equal(served[i], params[n].detach()) for i, n in enumerate(names))
        assert all(torch.equal(served[len(names) + i], ema.state_dict()[n]) for i, n in enumerate(names))
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()
