"""The ConvNeXt / timm ImageNet training augmentations, with Pillow and torch only (no timm, no torchvision).

Three parts, each switchable through `AugmentConfig` (defaults: the ConvNeXt paper's ImageNet recipe as the
MindSpore ConvNeXt seed tabulates it; the official ConvNeXt/DeiT code's ``--aa`` default is the ``-inc1``
variant, ``rand-m9-mstd0.5-inc1``, which `parse_randaugment` also accepts):

* **RandAugment** ``rand-m9-mstd0.5`` (`RandAugment`): per image, in the DataLoader *worker*, on the PIL
  image after the random resized crop + flip and before the uint8 tensor (``train_transform`` in
  ``images.py``; the loader builds it from ``DataConfig.randaugment``). timm's semantics: ``n`` ops drawn
  uniformly *with replacement* from `RAND_TRANSFORMS`, each applied with probability 0.5 at magnitude
  ``m`` plus Gaussian noise ``mstd``, clipped to [0, 10]; geometric ops resample bicubically (ConvNeXt's
  train interpolation) and fill with the mean pixel. Randomness comes from the worker's ``random.Random``.
* **Random erasing** (`random_erase`): per sample, on the *normalised* batch in the main process (or on
  the accelerator). timm erases after ``Normalize`` and fills with N(0, 1) noise in normalised space, i.e.
  noise with the dataset's mean and std per channel. Our workers ship uint8 tensors, where that fill would
  have to be clamped to [0, 255] and rounded, which changes its distribution; on the float batch after
  ``normalize`` it is exact, and costs the workers nothing.
* **Mixup / CutMix + label smoothing** (`mix_batch`, `soft_target_cross_entropy`): per batch, after
  erasing, as timm's ``Mixup(mode='batch')`` does in its train loop: every sample is mixed with its partner
  in the reversed batch, and targets become smoothed soft labels.

The training step calls `augment_batch` (erasing, then mixing) and `augment_loss`; see their docstrings.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from .images import IMAGENET_MEAN

# ------------------------------------------------------------------------------------------- RandAugment

# timm's ``_RAND_TRANSFORMS``, in its order (its 'Cutout' is left out there too: random erasing replaces it).
RAND_TRANSFORMS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# timm's ``_RAND_INCREASING_TRANSFORMS`` (``-inc1``): the same ops, with severity increasing with magnitude.
RAND_INCREASING_TRANSFORMS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
# timm's ``img_mean`` hparam: the ImageNet mean as a pixel, (124, 116, 104).
FILL: tuple[int, int, int] = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # type: ignore[assignment]
LEVEL_DENOM = 10.0  # magnitudes are on a 0..10 scale
TRANSLATE_PCT = 0.45  # timm's default ``translate_pct``: TranslateRel moves by up to 45% of the side
DEFAULT_RANDAUGMENT = "rand-m9-mstd0.5"


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed ``rand-...`` string: ``magnitude`` (m, 0..10 scale), ``num_layers`` (n ops per image),
    ``magnitude_std`` (mstd: Gaussian noise on the magnitude per op; inf: uniform in [0, m], as timm does for
    mstd > 100), ``magnitude_max`` (mmax: the clip's upper bound, default 10), ``increasing`` (inc1: timm's
    increasing-severity op variants), ``prob`` (each op's chance)."""

    magnitude: float = 10.0
    num_layers: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    increasing: bool = False
    prob: float = 0.5

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


_SECTION = re.compile(r"^([a-z]+)(\d.*)$")


def parse_randaugment(spec: str) -> RandAugmentSpec:
    """Parse timm's RandAugment string ``rand-m<int>[-n<int>][-mstd<float>][-mmax<int>][-inc<0|1>]`` (sections
    after ``rand`` in any order; m defaults to 10 and n to 2 as in timm). ValueError on anything else,
    including timm's ``w`` section (weighted op choice), which is not implemented."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"randaugment={spec!r}: expected a string like {DEFAULT_RANDAUGMENT!r}")
    head, *sections = spec.split("-")
    if head != "rand":
        raise ValueError(f"randaugment={spec!r}: must start with 'rand-' (e.g. {DEFAULT_RANDAUGMENT!r})")
    values: dict = {}
    for section in sections:
        match = _SECTION.match(section)
        if match is None:
            raise ValueError(f"randaugment={spec!r}: section {section!r} is not <key><number> "
                             "(keys: m, n, mstd, mmax, inc)")
        key, text = match.groups()
        if key in values:
            raise ValueError(f"randaugment={spec!r}: {key!r} is given twice")
        try:
            if key == "m":
                values[key] = float(int(text))
            elif key == "n":
                values[key] = int(text)
            elif key == "mstd":
                values[key] = float(text)
            elif key == "mmax":
                values[key] = float(int(text))
            elif key == "inc":
                values[key] = int(text)
                if values[key] not in (0, 1):
                    raise ValueError(f"randaugment={spec!r}: inc must be 0 or 1")
            else:
                raise ValueError(f"randaugment={spec!r}: unknown section {section!r} (keys: m, n, mstd, mmax, inc; "
                                 "timm's w is not supported)")
        except ValueError as error:
            if "randaugment=" in str(error):
                raise
            raise ValueError(f"randaugment={spec!r}: {key!r} needs {'a number' if key == 'mstd' else 'an integer'}, "
                             f"got {text!r}") from None
    magnitude_std = values.get("mstd", 0.0)
    if not math.isfinite(magnitude_std) or magnitude_std < 0:
        raise ValueError(f"randaugment={spec!r}: mstd must be a finite number >= 0")
    if magnitude_std > 100:  # timm: "use uniform sampling in 0 to magnitude if mstd is > 100"
        magnitude_std = math.inf
    result = RandAugmentSpec(magnitude=values.get("m", LEVEL_DENOM), num_layers=values.get("n", 2),
                             magnitude_std=magnitude_std, magnitude_max=values.get("mmax", LEVEL_DENOM),
                             increasing=bool(values.get("inc", 0)))
    if result.num_layers < 1:
        raise ValueError(f"randaugment={spec!r}: n must be at least 1 (or switch RandAugment off with None)")
    if result.magnitude_max <= 0:
        raise ValueError(f"randaugment={spec!r}: mmax must be positive")
    return result


def _negate(value: float, rng: random.Random) -> float:
    """timm's ``_randomly_negate``: the sign of geometric ops is a coin flip."""
    return -value if rng.random() > 0.5 else value


def op_argument(name: str, magnitude: float, rng: random.Random) -> float | int | None:
    """timm's level-to-argument mapping (``LEVEL_TO_ARG``), for the ops of both op lists.

    Rotate: +-30 deg * m/10; ShearX/Y: +-0.3 * m/10; TranslateX/YRel: +-0.45 * m/10 of the side; Posterize:
    keep int(4 * m/10) bits; Solarize: threshold int(256 * m/10); SolarizeAdd: add int(110 * m/10) below 128;
    Color/Contrast/Brightness/Sharpness: enhance factor 0.1 + 1.8 * m/10 (so 1.72 at m=9: *more* colour,
    contrast, brightness, sharpness; as in timm, these are not negated). The ``...Increasing`` variants:
    keep 4 - int(4 * m/10) bits; threshold 256 - int(256 * m/10); factor max(0.1, 1 +- 0.9 * m/10).
    None for the parameterless ops.
    """
    level = magnitude / LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return _negate(level * 30.0, rng)
    if name in ("ShearX", "ShearY"):
        return _negate(level * 0.3, rng)
    if name in ("TranslateXRel", "TranslateYRel"):
        return _negate(level * TRANSLATE_PCT, rng)
    if name == "Posterize":
        return int(level * 4)
    if name == "Solarize":
        return int(level * 256)
    if name == "SolarizeAdd":
        return int(level * 110)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if name == "SolarizeIncreasing":
        return 256 - int(level * 256)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return max(0.1, 1.0 + _negate(level * 0.9, rng))
    known = ", ".join(dict.fromkeys(RAND_TRANSFORMS + RAND_INCREASING_TRANSFORMS))
    raise ValueError(f"unknown RandAugment op {name!r}; known: {known}")


def _affine(image: Image.Image, matrix: tuple[float, ...], fill: tuple[int, int, int]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BICUBIC,
                           fillcolor=fill)


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def _posterize(image: Image.Image, bits: int) -> Image.Image:
    """Keep the top ``bits`` bits of each channel. Pillow 13's ImageOps.posterize refuses bits=0, which timm's
    Posterize reaches at magnitude 10 (and PosterizeIncreasing at 10) and which older Pillow turned black."""
    if bits >= 8:
        return image.copy()
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return image.point([i & mask for i in range(256)] * len(image.getbands()))


_ENHANCERS = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
              "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


def apply_op(image: Image.Image, name: str, magnitude: float, rng: random.Random,
             fill: tuple[int, int, int] = FILL) -> Image.Image:
    """Apply one RandAugment op at ``magnitude`` (0..10 scale), unconditionally (no probability, no noise);
    ``rng`` only draws the sign of Rotate/Shear/Translate. Returns a new image of the same size and mode."""
    arg = op_argument(name, magnitude, rng)
    name = name.removesuffix("Increasing")
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":
        return image.rotate(arg, resample=Image.Resampling.BICUBIC, fillcolor=fill)
    if name == "Posterize":
        return _posterize(image, arg)
    if name == "Solarize":
        return ImageOps.solarize(image, arg)
    if name == "SolarizeAdd":
        return _solarize_add(image, arg)
    if name in _ENHANCERS:
        return _ENHANCERS[name](image).enhance(arg)
    if name == "ShearX":
        return _affine(image, (1, arg, 0, 0, 1, 0), fill)
    if name == "ShearY":
        return _affine(image, (1, 0, 0, arg, 1, 0), fill)
    if name == "TranslateXRel":  # the output samples the input arg * width to the right: content moves left
        return _affine(image, (1, 0, arg * image.width, 0, 1, 0), fill)
    if name == "TranslateYRel":
        return _affine(image, (1, 0, 0, 0, 1, arg * image.height), fill)
    raise AssertionError(name)  # op_argument has rejected unknown names


class RandAugment:
    """timm's ``RandAugment(rand_augment_ops(m, hparams), num_layers=n)`` as a callable ``(image, rng) ->
    image``, seeded only by the ``rng`` it is given (the loader passes its worker's ``random.Random``).

    Per image: ``num_layers`` ops chosen uniformly with replacement from ``ops`` (default: `RAND_TRANSFORMS`,
    or `RAND_INCREASING_TRANSFORMS` for ``inc1``); each one is skipped with
    probability 1 - ``prob``, else its magnitude is m + N(0, mstd) (uniform in [0, m] for mstd inf) clipped
    to [0, mmax] and it is applied (see `apply_op`). Picklable, so it can travel to DataLoader workers.
    """

    def __init__(self, spec: str | RandAugmentSpec = DEFAULT_RANDAUGMENT, *, ops: tuple[str, ...] | None = None,
                 fill: tuple[int, int, int] = FILL) -> None:
        self.spec = parse_randaugment(spec) if isinstance(spec, str) else spec
        ops = self.spec.ops if ops is None else tuple(ops)
        for name in ops:
            op_argument(name, 0.0, random.Random(0))  # ValueError for unknown names, now rather than per image
        self.ops, self.fill = ops, fill

    def magnitude(self, rng: random.Random) -> float:
        """One op's magnitude: the spec's m with its noise, clipped as timm clips it."""
        spec = self.spec
        magnitude = spec.magnitude
        if spec.magnitude_std == math.inf:
            magnitude = rng.uniform(0.0, magnitude)
        elif spec.magnitude_std > 0:
            magnitude = rng.gauss(magnitude, spec.magnitude_std)
        return max(0.0, min(magnitude, spec.magnitude_max))

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        for _ in range(self.spec.num_layers):
            name = self.ops[rng.randrange(len(self.ops))]
            if self.spec.prob < 1.0 and rng.random() > self.spec.prob:
                continue
            image = apply_op(image, name, self.magnitude(rng), rng, self.fill)
        return image

    def __repr__(self) -> str:
        return f"RandAugment({self.spec}, ops={len(self.ops)}, fill={self.fill})"


# ----------------------------------------------------------------------------------------------- config


@dataclass
class AugmentConfig:
    """The training augmentations; defaults are the ConvNeXt ImageNet recipe (timm's flags in brackets).

    ``randaugment`` [--aa]: a ``rand-m<M>[-n<N>][-mstd<S>]`` string, or None for off. It runs in the loader's
    workers, so pass it to ``DataConfig(randaugment=...)``; the rest runs on the normalised batch.
    ``random_erasing`` [--reprob]: probability per sample (pixel mode, one box, 2%-1/3 of the area); 0: off.
    ``mixup`` / ``cutmix`` [--mixup / --cutmix]: Beta(alpha, alpha) parameters; 0 switches that one off,
    both 0 switch mixing off. ``mix_prob`` [--mixup-prob]: chance a batch is mixed at all.
    ``mix_switch_prob`` [--mixup-switch-prob]: chance of CutMix rather than Mixup when both are on.
    ``label_smoothing`` [--smoothing]: applied to the (mixed) targets, or through the loss when mixing is off.
    """

    randaugment: str | None = DEFAULT_RANDAUGMENT
    random_erasing: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.randaugment is not None:
            parse_randaugment(self.randaugment)
        for name in ("random_erasing", "mix_prob", "mix_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be a probability in [0, 1]")
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name}={value}: must be a Beta alpha >= 0 (0: off)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing}: must be in [0, 1)")

    @classmethod
    def off(cls) -> AugmentConfig:
        """Everything off: crop + flip only, hard labels, plain cross entropy."""
        return cls(randaugment=None, random_erasing=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)

    @property
    def mixing(self) -> bool:
        """Whether `mix_batch` mixes at all (else `augment_batch` keeps integer labels)."""
        return self.mix_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


# ------------------------------------------------------------------------------------------ batch level


def _scalar_rng(generator: torch.Generator | None) -> random.Random:
    """A Python RNG for the per-sample / per-batch scalars (box sizes, Beta draws), seeded from ``generator``
    so everything is reproducible from it alone. One draw (one device sync for a CUDA generator) per call."""
    device = generator.device if generator is not None else "cpu"
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator, device=device)))


def _normal(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


def erase_box(height: int, width: int, rng: random.Random, *, min_area: float = 0.02, max_area: float = 1 / 3,
              min_aspect: float = 0.3) -> tuple[int, int, int, int] | None:
    """timm's RandomErasing box (one box, ``max_count=1``): area fraction uniform in [min_area, max_area],
    aspect (h/w) log-uniform in [min_aspect, 1/min_aspect], up to 10 tries to fit strictly inside the image;
    (top, left, h, w), or None when no try fitted (timm then erases nothing)."""
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target = rng.uniform(min_area, max_area) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if w < width and h < height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return None


def random_erase(images: torch.Tensor, probability: float = 0.25, generator: torch.Generator | None = None,
                 *, min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3) -> torch.Tensor:
    """timm's ``RandomErasing(probability, mode='pixel', max_count=1)`` on a *normalised* float batch
    (B, C, H, W): each sample, with ``probability``, gets one box (`erase_box`) replaced by per-pixel N(0, 1)
    noise, i.e. noise with the data's mean and std per channel. Returns a new tensor; ``images`` is untouched.
    Randomness comes from ``generator`` only (None: torch's default)."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"random_erase wants a normalised float (B, C, H, W) batch, got {images.dtype} "
                         f"{tuple(images.shape)}")
    out = images.clone()
    if probability <= 0:
        return out
    rng = _scalar_rng(generator)
    batch, channels, height, width = out.shape
    for i in range(batch):
        if rng.random() > probability:
            continue
        box = erase_box(height, width, rng, min_area=min_area, max_area=max_area, min_aspect=min_aspect)
        if box is not None:
            top, left, h, w = box
            out[i, :, top:top + h, left:left + w] = _normal((channels, h, w), generator, out)
    return out


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int -> (B, num_classes) float32: ``1 - smoothing + smoothing/C`` on the label, ``smoothing/C``
    elsewhere (timm's ``one_hot`` with its on/off values; the same targets as F.cross_entropy's smoothing)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), on)


def mix_params(rng: random.Random, config: AugmentConfig) -> tuple[float, bool]:
    """timm's ``Mixup._params_per_batch``: (lambda, use_cutmix). lambda 1.0: no mixing for this batch."""
    if not config.mixing or rng.random() >= config.mix_prob:
        return 1.0, False
    if config.mixup > 0 and config.cutmix > 0:
        use_cutmix = rng.random() < config.mix_switch_prob
        alpha = config.cutmix if use_cutmix else config.mixup
    else:
        use_cutmix = config.cutmix > 0
        alpha = config.cutmix if use_cutmix else config.mixup
    return rng.betavariate(alpha, alpha), use_cutmix


def cutmix_box(height: int, width: int, lam: float, rng: random.Random) -> tuple[tuple[int, int, int, int], float]:
    """timm's ``rand_bbox`` + ``correct_lam``: a box of sides ~sqrt(1 - lam) of the image's, centred uniformly
    (so it may be clipped at the border); returns ((y0, y1, x0, x1), lam) with lam = 1 - box area fraction."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randrange(height), rng.randrange(width)
    y0, y1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    x0, x1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, generator: torch.Generator | None,
              config: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's ``Mixup(mode='batch', correct_lam=True)`` on a normalised (B, C, H, W) batch -> (images, soft
    targets (B, num_classes) float32, rows summing to 1).

    Sample i is mixed with sample B-1-i (the batch reversed; with an odd B the middle one meets itself). With
    probability ``mix_prob``: CutMix with probability ``mix_switch_prob`` (when both alphas are on), else Mixup;
    lambda ~ Beta(alpha, alpha). Mixup: ``lam * x + (1 - lam) * x_rev``. CutMix: a box (`cutmix_box`) of
    x_rev pasted into x, and lambda corrected to the kept area. Targets: ``lam * y + (1 - lam) * y_rev``
    with y the `smooth_one_hot` labels. Returns new tensors; the inputs are untouched.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"mix_batch wants a normalised float (B, C, H, W) batch, got {images.dtype} "
                         f"{tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels {tuple(labels.shape)} do not match a batch of {images.shape[0]}")
    rng = _scalar_rng(generator)
    lam, use_cutmix = mix_params(rng, config)
    if lam < 1.0:
        if use_cutmix:
            (y0, y1, x0, x1), lam = cutmix_box(images.shape[2], images.shape[3], lam, rng)
            out = images.clone()
            out[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        else:
            out = images * lam + images.flip(0) * (1.0 - lam)
    else:
        out = images.clone()
    targets = smooth_one_hot(labels, num_classes, config.label_smoothing)
    return out, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c targets[c] * log_softmax(logits)[c]`` (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def augment_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, generator: torch.Generator | None,
                  config: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch-level part of the recipe, in timm's order: random erasing, then Mixup/CutMix.

    ``images``: the loader's normalised float batch (``Batch.images``), on any device; ``labels``: its (B,)
    int labels. Returns (images, targets): soft (B, num_classes) float32 targets when ``config.mixing``,
    else the integer labels unchanged. Either way `augment_loss` is the matching loss.
    """
    if config.random_erasing > 0:
        images = random_erase(images, config.random_erasing, generator)
    if config.mixing:
        return mix_batch(images, labels, num_classes, generator, config)
    return images, labels


def augment_loss(logits: torch.Tensor, targets: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """Cross entropy for `augment_batch`'s targets: soft targets (already smoothed) -> soft-target CE; integer
    labels -> F.cross_entropy with ``config.label_smoothing``."""
    if targets.is_floating_point():
        return soft_target_cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)

