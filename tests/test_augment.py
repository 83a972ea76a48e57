"""Tests for convforever.data.augment: RandAugment (timm semantics, Pillow only), random erasing, Mixup/CutMix with
label smoothing, the soft-target loss, and RandAugment inside the loader. Behaviour, not just "it runs"."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from convforever.data import DataConfig, make_loader, write_demo_dataset
from convforever.data.augment import (
    DEFAULT_RANDAUGMENT,
    FILL,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    AugmentConfig,
    RandAugment,
    RandAugmentSpec,
    apply_op,
    augment_batch,
    augment_loss,
    mix_batch,
    op_argument,
    parse_randaugment,
    random_erase,
    smooth_one_hot,
    soft_target_cross_entropy,
)
from convforever.data.images import IMAGENET_MEAN, train_transform

# ----------------------------------------------------------------------------------------------- helpers


def _noise_image(width: int = 32, height: int = 32, low: int = 40, high: int = 200, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(low, high, (height, width, 3), dtype=np.uint8))


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def _rng_with_sign(positive: bool) -> random.Random:
    """A Random whose first draw makes timm's _randomly_negate keep (positive) or flip the sign."""
    for seed in range(100):
        if (random.Random(seed).random() > 0.5) != positive:
            return random.Random(seed)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------- parsing and config


def test_parse_recipe_default():
    spec = parse_randaugment("rand-m9-mstd0.5")
    assert DEFAULT_RANDAUGMENT == "rand-m9-mstd0.5"
    assert (spec.magnitude, spec.num_layers, spec.magnitude_std, spec.magnitude_max, spec.prob) == (9, 2, 0.5, 10, 0.5)
    assert not spec.increasing
    # timm's _RAND_TRANSFORMS, in its order, without Cutout.
    assert spec.ops == RAND_TRANSFORMS == (
        "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
        "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    assert RandAugment().ops == RAND_TRANSFORMS and RandAugment().spec == spec


def test_parse_variants():
    spec = parse_randaugment("rand-m7-n3")
    assert (spec.magnitude, spec.num_layers, spec.magnitude_std) == (7, 3, 0.0)
    assert parse_randaugment("rand-n3-m7") == spec  # sections in any order
    assert parse_randaugment("rand") == RandAugmentSpec(magnitude=10, num_layers=2)  # timm's defaults
    inc = parse_randaugment("rand-m9-mstd0.5-inc1")
    assert inc.increasing and inc.ops == RAND_INCREASING_TRANSFORMS and len(inc.ops) == 15
    assert parse_randaugment("rand-m9-inc0").ops == RAND_TRANSFORMS
    assert parse_randaugment("rand-m9-mstd101").magnitude_std == math.inf  # timm: uniform for mstd > 100
    assert parse_randaugment("rand-m15-mmax20").magnitude_max == 20


@pytest.mark.parametrize("bad, message", [
    ("", "expected a string"),
    ("auto-m9", "must start with 'rand-'"),
    ("rand-m9-x3", "unknown section"),
    ("rand-m9-w0", "w is not supported"),
    ("rand-m9-mstd", "not <key><number>"),
    ("rand-m9--n2", "not <key><number>"),
    ("rand-m9.5", "'m' needs an integer"),
    ("rand-m9-mstd0.5x", "'mstd' needs a number"),
    ("rand-m9-m8", "given twice"),
    ("rand-n0", "n must be at least 1"),
    ("rand-m9-inc2", "inc must be 0 or 1"),
    ("rand-m9-mstdnan", "not <key><number>"),
])
def test_parse_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_randaugment(bad)


def test_config_defaults_and_validation():
    cfg = AugmentConfig()
    assert (cfg.randaugment, cfg.random_erasing, cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.mix_switch_prob,
            cfg.label_smoothing) == ("rand-m9-mstd0.5", 0.25, 0.8, 1.0, 1.0, 0.5, 0.1)
    assert cfg.mixing and not AugmentConfig.off().mixing and not AugmentConfig(mixup=0, cutmix=0).mixing
    assert FILL == (124, 116, 104) == tuple(round(255 * m) for m in IMAGENET_MEAN)
    for bad in ({"randaugment": "rand-q1"}, {"random_erasing": 1.5}, {"mixup": -1.0}, {"cutmix": math.nan},
                {"mix_switch_prob": -0.1}, {"label_smoothing": 1.0}):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)
    with pytest.raises(ValueError, match="unknown section"):
        DataConfig(randaugment="rand-m9-q2")  # fails in the main process, not inside a worker
    assert DataConfig().randaugment is None  # plain loaders stay crop + flip; the trainer passes the recipe's


# ------------------------------------------------------------------------------------------------ the ops


def test_op_arguments_at_magnitude_9():
    rng = random.Random(0)
    assert abs(op_argument("Rotate", 9, rng)) == pytest.approx(27.0)
    assert abs(op_argument("ShearX", 9, rng)) == pytest.approx(0.27)
    assert abs(op_argument("TranslateYRel", 9, rng)) == pytest.approx(0.405)
    assert op_argument("Posterize", 9, rng) == 3
    assert op_argument("Solarize", 9, rng) == 230
    assert op_argument("SolarizeAdd", 9, rng) == 99
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert op_argument(name, 9, rng) == pytest.approx(1.72)
        assert op_argument(name, 0, rng) == pytest.approx(0.1)
    assert op_argument("PosterizeIncreasing", 9, rng) == 1 and op_argument("SolarizeIncreasing", 9, rng) == 26
    assert {round(op_argument("BrightnessIncreasing", 9, random.Random(s)), 2) for s in range(20)} == {0.19, 1.81}
    assert op_argument("Invert", 9, rng) is None
    # Both signs occur for the geometric ops.
    assert {math.copysign(1, op_argument("Rotate", 5, random.Random(s))) for s in range(20)} == {-1.0, 1.0}
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        op_argument("Cutout", 9, rng)
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        RandAugment(ops=("Cutout",))


@pytest.mark.parametrize("name", sorted(set(RAND_TRANSFORMS + RAND_INCREASING_TRANSFORMS)))
def test_every_op_keeps_size_and_mode(name):
    image = _noise_image(23, 17)
    for magnitude in (0, 4.5, 9, 10):
        out = apply_op(image, name, magnitude, random.Random(0))
        assert out.mode == "RGB" and out.size == (23, 17)
        assert np.asarray(out).dtype == np.uint8
    assert _px(image).min() >= 40  # the input is never modified in place


def test_colour_ops_move_in_the_expected_direction():
    image = _noise_image()
    a = _px(image)
    rng = random.Random(0)
    assert _px(apply_op(image, "Brightness", 9, rng)).mean() > a.mean() + 40
    assert _px(apply_op(image, "Brightness", 0, rng)).mean() < a.mean() * 0.2
    assert _px(apply_op(image, "Contrast", 9, rng)).std() > a.std() * 1.3
    assert _px(apply_op(image, "Contrast", 0, rng)).std() < a.std() * 0.3

    def saturation(px: np.ndarray) -> float:
        return float((px.max(axis=2) - px.min(axis=2)).mean())

    assert saturation(_px(apply_op(image, "Color", 9, rng))) > saturation(a) * 1.3
    assert saturation(_px(apply_op(image, "Color", 0, rng))) < saturation(a) * 0.3

    def edges(px: np.ndarray) -> float:
        return float(np.abs(np.diff(px, axis=1)).mean())

    blurred = image.filter(ImageFilter.GaussianBlur(1))
    assert edges(_px(apply_op(blurred, "Sharpness", 9, rng))) > edges(_px(blurred)) * 1.2
    # Invert, Solarize, SolarizeAdd, Posterize: exact per-pixel definitions.
    full = _noise_image(low=0, high=256, seed=1)
    f = _px(full)
    assert np.array_equal(_px(apply_op(full, "Invert", 9, rng)), 255 - f)
    assert np.array_equal(_px(apply_op(full, "Solarize", 9, rng)), np.where(f >= 230, 255 - f, f))
    assert np.array_equal(_px(apply_op(full, "SolarizeAdd", 9, rng)), np.where(f < 128, np.minimum(f + 99, 255), f))
    assert np.array_equal(_px(apply_op(full, "Posterize", 9, rng)), f & 0b11100000)
    assert np.array_equal(_px(apply_op(full, "Posterize", 10, rng)), f & 0b11110000)
    assert _px(apply_op(full, "Posterize", 0, rng)).max() == 0  # 0 bits kept: black, as timm with older Pillow
    # AutoContrast stretches each channel to 0..255; Equalize spreads a narrow histogram.
    stretched = _px(apply_op(image, "AutoContrast", 9, rng))
    assert (stretched.min(axis=(0, 1)) == 0).all() and (stretched.max(axis=(0, 1)) == 255).all()
    narrow = _noise_image(low=100, high=120)
    assert np.ptp(_px(apply_op(narrow, "Equalize", 9, rng))) > 200


def test_geometric_ops_at_magnitude_0_are_the_identity():
    image = _noise_image(low=0, high=256)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        assert np.array_equal(_px(apply_op(image, name, 0, random.Random(0))), _px(image)), name


def test_geometric_ops_move_content_and_fill_with_the_mean_pixel():
    # A black 20x20 image with one white column at x=10: TranslateXRel at m=10 moves it by 0.45 * 20 = 9 px.
    px = np.zeros((20, 20, 3), dtype=np.uint8)
    px[:, 10] = 255
    image = Image.fromarray(px)
    for positive, column in ((True, 1), (False, 19)):
        out = _px(apply_op(image, "TranslateXRel", 10, _rng_with_sign(positive)))
        assert (out[:, column] == 255).all() and (np.delete(out, column, axis=1) != 255).all()
        vacated = out[:, 11:] if positive else out[:, :9]  # the side the content left: mean-pixel fill
        assert (vacated == FILL).all()
    out = _px(apply_op(image.rotate(90), "TranslateYRel", 10, _rng_with_sign(True)))  # white row at y=9 -> y=0
    assert (out[0] == 255).all() and (out[11:] == FILL).all()
    # Rotate at m=10 is +-30 degrees about the centre: the corners come from outside the image.
    solid = Image.new("RGB", (32, 32), (10, 200, 30))
    for positive in (True, False):
        out = _px(apply_op(solid, "Rotate", 10, _rng_with_sign(positive)))
        assert (out[0, 0] == FILL).all() and (out[-1, -1] == FILL).all() and (out[16, 16] == (10, 200, 30)).all()
        expected = solid.rotate(30 if positive else -30, resample=Image.Resampling.BICUBIC, fillcolor=FILL)
        assert np.array_equal(out, _px(expected))
    # ShearX by 0.3: the bottom row's sample point moves 0.3 * 31 ~ 9 px right, so a corner gets filled.
    out = _px(apply_op(solid, "ShearX", 10, _rng_with_sign(True)))
    assert (out[0, 5] == (10, 200, 30)).all() and (out[-1, -1] == FILL).all()
    out = _px(apply_op(solid, "ShearY", 10, _rng_with_sign(True)))
    assert (out[5, 0] == (10, 200, 30)).all() and (out[-1, -1] == FILL).all()


# ------------------------------------------------------------------------------------------ RandAugment


def test_randaugment_is_deterministic_per_seed_and_uses_only_its_rng():
    image = _noise_image()
    augment = RandAugment("rand-m9-mstd0.5")
    random.seed(1)
    a = [_px(augment(image, random.Random(seed))) for seed in range(12)]
    random.seed(2)  # the global RNG must not matter
    np.random.seed(2)
    torch.manual_seed(2)
    b = [_px(augment(image, random.Random(seed))) for seed in range(12)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({x.tobytes() for x in a}) > 6  # different seeds, different results
    # About a quarter of images come out unchanged: both ops skipped (0.5 * 0.5), or ops that change nothing.
    unchanged = sum(np.array_equal(x, _px(image)) for x in (_px(augment(image, random.Random(s))) for s in range(400)))
    assert 0.18 < unchanged / 400 < 0.35


def test_randaugment_probability_and_uniform_choice():
    image = _noise_image(8, 8)
    inverted = 255 - _px(image)
    # One op per image, applied with probability 0.5.
    only_invert = RandAugment(RandAugmentSpec(magnitude=9, num_layers=1), ops=("Invert",))
    rng = random.Random(0)
    hits = sum(np.array_equal(_px(only_invert(image, rng)), inverted) for _ in range(2000))
    assert 0.45 < hits / 2000 < 0.55
    # Always applied, two candidate ops: each is chosen about half the time.
    two = RandAugment(RandAugmentSpec(magnitude=9, num_layers=1, prob=1.0), ops=("Invert", "Brightness"))
    brighter = _px(apply_op(image, "Brightness", 9, rng))
    results = [_px(two(image, rng)) for _ in range(2000)]
    n_invert = sum(np.array_equal(r, inverted) for r in results)
    n_bright = sum(np.array_equal(r, brighter) for r in results)
    assert n_invert + n_bright == 2000 and 0.45 < n_invert / 2000 < 0.55
    # n=3 applies three ops in sequence: Invert three times is Invert.
    three = RandAugment(RandAugmentSpec(num_layers=3, prob=1.0), ops=("Invert",))
    assert np.array_equal(_px(three(image, rng)), inverted)


def test_randaugment_magnitude_noise_is_clipped_gaussian():
    rng = random.Random(0)
    draws = [RandAugment("rand-m9-mstd0.5").magnitude(rng) for _ in range(20000)]
    assert min(draws) >= 0 and max(draws) == 10.0  # clipped at 10 (2.3% of N(9, 0.5) lies above it)
    assert statistics.mean(draws) == pytest.approx(8.99, abs=0.02)
    assert statistics.stdev(draws) == pytest.approx(0.48, abs=0.02)
    assert {RandAugment("rand-m7-n3").magnitude(rng) for _ in range(10)} == {7.0}
    uniform = [RandAugment("rand-m9-mstd200").magnitude(rng) for _ in range(5000)]
    assert 0 <= min(uniform) < 0.1 and 8.9 < max(uniform) <= 9
    assert statistics.mean(uniform) == pytest.approx(4.5, abs=0.2)


def test_train_transform_with_randaugment():
    image = _noise_image(50, 40, low=0, high=256)
    augment = RandAugment()
    a = train_transform(image, 24, random.Random(3), scale=(0.35, 1.0), augment=augment)
    assert a.shape == (3, 24, 24) and a.dtype == torch.uint8
    assert torch.equal(a, train_transform(image, 24, random.Random(3), scale=(0.35, 1.0), augment=augment))
    plain = [train_transform(image, 24, random.Random(s), scale=(0.35, 1.0)) for s in range(20)]
    augmented = [train_transform(image, 24, random.Random(s), scale=(0.35, 1.0), augment=augment) for s in range(20)]
    # The crop and flip come first, from the same draws: RandAugment changes most images but not their framing.
    assert sum(not torch.equal(p, q) for p, q in zip(plain, augmented, strict=True)) >= 10


# -------------------------------------------------------------------------------------------- erasing


def test_random_erase_probability_area_and_fill():
    images = torch.zeros(4000, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = random_erase(images, 0.25, g)
    assert torch.equal(images, torch.zeros_like(images))  # input untouched
    changed = out != 0
    assert torch.equal(changed.all(dim=1), changed.any(dim=1))  # all channels of a box are erased
    mask = changed[:, 0]
    erased = mask.flatten(1).any(dim=1)
    # timm erases with probability 0.25, minus the rare draws where none of 10 boxes fits (aspect up to 3.3).
    assert 0.21 < erased.float().mean().item() < 0.27
    fractions = []
    for m in mask[erased]:
        rows, cols = m.any(dim=1).nonzero().flatten(), m.any(dim=0).nonzero().flatten()
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert m.sum() == h * w and h < 32 and w < 32  # one solid rectangle, strictly inside
        fractions.append((h * w).item() / (32 * 32))
    # 2%..1/3 of the area, up to the rounding of h and w.
    assert 0.015 < min(fractions) < 0.04 and 0.29 < max(fractions) < 0.36
    noise = out[changed]
    assert abs(noise.mean().item()) < 0.01 and noise.std().item() == pytest.approx(1.0, abs=0.01)
    # Deterministic per generator state; probability 0 and 1.
    assert torch.equal(out, random_erase(images, 0.25, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, random_erase(images, 0.25, torch.Generator().manual_seed(1)))
    assert torch.equal(random_erase(images[:50], 0.0, g), images[:50])
    assert (random_erase(images[:200], 1.0, g) != 0).flatten(1).any(dim=1).float().mean() > 0.9
    with pytest.raises(ValueError, match="normalised float"):
        random_erase(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 0.25, g)


# ------------------------------------------------------------------------------------- mixup and cutmix


def _constant_batch(batch: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is filled with the value i and labelled i."""
    images = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, size, size).clone()
    return images, torch.arange(batch)


def _lam_from_targets(targets: torch.Tensor, labels: torch.Tensor, num_classes: int, smoothing: float) -> float:
    off = smoothing / num_classes
    on = 1 - smoothing + off
    return ((targets[0, labels[0]] - off) / (on - off)).item()


def test_smoothing_values_are_exact():
    labels = torch.tensor([3, 0, 9])
    targets = smooth_one_hot(labels, 10, 0.1)
    assert targets.dtype == torch.float32
    assert targets[0, 3].item() == torch.tensor(0.91).item() and targets[0, 4].item() == torch.tensor(0.01).item()
    images, _ = _constant_batch(3)
    out, mixed = mix_batch(images, labels, 10, torch.Generator().manual_seed(0), AugmentConfig(mix_prob=0.0))
    assert torch.equal(out, images) and torch.equal(mixed, targets)  # not mixed: lambda 1, smoothed one-hots
    _, hard = mix_batch(images, labels, 10, None, AugmentConfig(mix_prob=0.0, label_smoothing=0.0))
    assert torch.equal(hard, F.one_hot(labels, 10).float())


def test_mix_batch_targets_images_and_switch_probability():
    batch, classes, smoothing = 8, 10, 0.1
    images, labels = _constant_batch(batch)
    g = torch.Generator().manual_seed(0)
    config = AugmentConfig()
    off = smoothing / classes
    on = 1 - smoothing + off
    cutmix_lams, mixup_lams = [], []
    for _ in range(600):
        out, targets = mix_batch(images, labels, classes, g, config)
        assert torch.equal(images, _constant_batch(batch)[0])  # inputs untouched
        assert targets.shape == (batch, classes) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(dim=1), torch.ones(batch))
        lam = _lam_from_targets(targets, labels, classes, smoothing)
        for i in range(batch):  # sample i: lam of its own label, 1 - lam of its partner's (the batch reversed)
            j = batch - 1 - i
            expected = torch.full((classes,), off)
            expected[i] += lam * (on - off)
            expected[j] += (1 - lam) * (on - off)
            assert torch.allclose(targets[i], expected, atol=1e-6)
        own = out == labels.view(-1, 1, 1, 1).float()
        partner = out == labels.flip(0).view(-1, 1, 1, 1).float()
        if (own | partner).all():  # CutMix: every pixel is from the sample or its partner
            # One box for the whole batch; the label mass equals the kept area (timm's correct_lam).
            box = partner[0, 0]
            assert all(torch.equal(partner[i, c], box) for i in range(batch) for c in range(3))
            assert lam == pytest.approx(1 - box.float().mean().item(), abs=1e-6)
            rows, cols = box.any(dim=1).nonzero().flatten(), box.any(dim=0).nonzero().flatten()
            if len(rows):
                assert box.sum() == len(rows) * len(cols)  # a rectangle
            cutmix_lams.append(lam)
        else:  # Mixup: a blend with the same lambda as the targets
            expected = lam * labels.float() + (1 - lam) * labels.flip(0).float()
            assert torch.allclose(out, expected.view(-1, 1, 1, 1).expand_as(out), atol=1e-5)
            mixup_lams.append(lam)
    assert 0.44 < len(cutmix_lams) / 600 < 0.56  # switch probability 0.5
    # Beta(0.8, 0.8) for Mixup (variance 0.096). CutMix draws Beta(1, 1), but its box is clipped at the border and
    # its sides rounded down, so the corrected lambda averages ~0.72 at 16 px (timm's formulas, simulated in numpy).
    assert statistics.mean(mixup_lams) == pytest.approx(0.5, abs=0.05)
    assert statistics.variance(mixup_lams) == pytest.approx(0.0962, abs=0.02)
    assert statistics.mean(cutmix_lams) == pytest.approx(0.72, abs=0.05)


def test_mix_batch_single_mode_determinism_and_odd_batches():
    images, labels = _constant_batch(5)
    cut_only = AugmentConfig(mixup=0.0)
    for seed in range(30):
        out, _ = mix_batch(images, labels, 10, torch.Generator().manual_seed(seed), cut_only)
        assert torch.equal(out.round(), out)  # never blended
    mix_only = AugmentConfig(cutmix=0.0)
    out, targets = mix_batch(images, labels, 10, torch.Generator().manual_seed(0), mix_only)
    assert not torch.equal(out.round(), out)
    # The middle of an odd batch is its own partner: it keeps its own image and label.
    assert torch.equal(out[2], images[2]) and targets[2, 2].item() == pytest.approx(0.91)
    again = mix_batch(images, labels, 10, torch.Generator().manual_seed(0), mix_only)
    assert torch.equal(again[0], out) and torch.equal(again[1], targets)
    with pytest.raises(ValueError, match="do not match"):
        mix_batch(images, labels[:3], 10, None, mix_only)


# ------------------------------------------------------------------------------------------------ losses


def test_soft_target_cross_entropy_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g)
    labels = torch.randint(0, 10, (6,), generator=g)
    assert soft_target_cross_entropy(logits, F.one_hot(labels, 10).float()).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert soft_target_cross_entropy(logits, smooth_one_hot(labels, 10, 0.1)).item() == pytest.approx(
        smoothed.item(), rel=1e-6)
    config = AugmentConfig()
    assert augment_loss(logits, labels, config).item() == pytest.approx(smoothed.item(), rel=1e-6)
    assert augment_loss(logits, smooth_one_hot(labels, 10, 0.1), config).item() == pytest.approx(smoothed.item(),
                                                                                                 rel=1e-6)


def test_augment_batch_end_to_end():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 16, 16, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    out, targets = augment_batch(images, labels, 10, g, AugmentConfig())
    assert out.shape == images.shape and targets.shape == (8, 10) and targets.is_floating_point()
    logits = torch.randn(8, 10, requires_grad=True)
    augment_loss(logits, targets, AugmentConfig()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    plain, hard = augment_batch(images, labels, 10, g, AugmentConfig.off())
    assert torch.equal(plain, images) and torch.equal(hard, labels)


# ------------------------------------------------------------------------------------------------ loader


def test_loader_with_randaugment_is_deterministic(tmp_path):
    demo = write_demo_dataset(tmp_path, train_rows=48, eval_rows=4, image_size=32, num_shards=1)

    def batches(randaugment: str | None, train: bool = True) -> list:
        config = DataConfig(files=demo.train_files, image_size=16, batch_size=8, train=train, seed=3,
                            shuffle_buffer=16, randaugment=randaugment)
        out = []
        for batch in make_loader(config):
            assert batch.images.shape == (8, 3, 16, 16) and batch.images.dtype == torch.float32
            assert batch.labels.dtype == torch.int64
            out.append((batch.images, batch.labels))
            if len(out) == 3:
                break
        return out

    a, b = batches("rand-m9-mstd0.5"), batches("rand-m9-mstd0.5")
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    plain = batches(None)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, plain, strict=True))
    # Evaluation ignores it.
    evaluated = zip(batches("rand-m9-mstd0.5", train=False), batches(None, train=False), strict=True)
    assert all(torch.equal(x[0], y[0]) for x, y in evaluated)
