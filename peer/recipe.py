"""The training recipe: learning-rate schedule, gradient clipping, weight EMA, blur curriculum and LeRaC.

Every piece is keyed to the swarm's global step (hivemind's epoch, ``opt.local_epoch``), never to a peer's
own count of micro-batches, so peers that join late or run at different speeds all follow one schedule:

- ``lr_factor``: linear warm-up, then (optionally) cosine decay to ``min_lr`` at ``total_steps``; hivemind
  steps the ``LambdaLR`` once per global step (``TrainingStateAverager._update_scheduler``), and the update
  that moves the swarm from step ``t`` to ``t + 1`` uses ``lr * lr_factor(t)``.
- ``clipped(optimizer_cls)``: a subclass whose ``step()`` clips the gradient it finds in ``p.grad`` first.
  hivemind writes the *averaged* gradient there just before it calls the wrapped optimizer's ``step()``
  (``Optimizer._load_averaged_gradients_into_optimizer_``; with ``offload_optimizer`` the offloaded
  parameters' ``.grad`` *are* the gradient averager's output buffers), so this clips exactly the swarm's
  gradient, never one peer's micro-batch.
- ``WeightEMA``: an exponential moving average of the weights, updated once per global step.
- ``blur_batch``: a Gaussian-blur curriculum whose sigma (and blurred fraction) fall linearly to 0.
- ``lerac_param_groups`` / ``lerac_lambdas``: LeRaC's per-layer learning-rate curriculum.

ConvNeXt's ImageNet-1K recipe (Liu et al. 2022, arXiv:2201.03545, Table 9, and the official ``main.py``):
AdamW, betas (0.9, 0.999), weight decay 0.05, cosine schedule with linear warm-up (20 of 300 epochs),
min lr 1e-6, EMA decay 0.9999. The paper uses no gradient clipping; 5.0 here is a swarm safeguard: one bad
contribution (or a compression artefact) spikes the averaged gradient of *every* peer at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from convforever.model.parameters import param_groups

logger = logging.getLogger(__name__)

LERAC_GRANULARITIES = ("block", "stage")


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RecipeConfig:
    """Everything the swarm must agree on about *how* it optimises; every peer of a run needs the same values.

    Defaults follow ConvNeXt's ImageNet-1K recipe (see the module docstring) except ``lr``/``warmup_steps``,
    which keep ConvForever's defaults (ConvNeXt's 4e-3 is for batch 4096; the swarm's global batch is
    ``--target-batch-size``), ``total_steps`` (None: no decay, the warm-up-only behaviour ConvForever had)
    and ``max_grad_norm`` (see the module docstring). Blur and LeRaC are off by default.
    """

    lr: float = 1e-3  # --lr: peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-6  # --min-lr: the cosine's floor at --total-steps (ConvNeXt: 1e-6)
    warmup_steps: int = 10  # --warmup-steps: global steps of linear warm-up
    total_steps: Optional[int] = None  # --total-steps: cosine decay ends here; None = constant after warm-up
    weight_decay: float = 0.05  # --weight-decay (decoupled, AdamW); never on biases/norms/layer scale
    betas: tuple[float, float] = (0.9, 0.999)  # --betas
    eps: float = 1e-8  # AdamW epsilon (no flag)
    max_grad_norm: Optional[float] = 5.0  # --clip-grad: on the averaged gradient; None or 0 = off
    ema: bool = True  # --ema / --no-ema
    ema_decay: float = 0.9999  # --ema-decay, per global step
    ema_warmup: bool = True  # --ema-warmup / --no-ema-warmup: decay = min(decay, (1 + t) / (10 + t))
    ema_device: str = "cpu"  # --ema-device: must be cpu with --offload-optimizer if the EMA is shared
    blur_steps: int = 0  # --blur-steps: global steps over which sigma falls to 0; 0 = no blur
    blur_sigma: float = 2.0  # --blur-sigma: sigma (in pixels) at step 0
    blur_fraction_start: Optional[float] = None  # --blur-fraction-start: None = blur every image
    lerac: bool = False  # --lerac
    lerac_steps: int = 500  # --lerac-steps: global steps until every layer's lr has reached --lr
    lerac_factor: float = 10.0  # --lerac-factor: each layer group starts this many times lower than the previous
    lerac_min_lr: float = 1e-7  # --lerac-min-lr: floor of the initial per-layer learning rates (eta_min)
    lerac_granularity: str = "block"  # --lerac-granularity: block (stem, each block, head) or stage

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.max_grad_norm is not None and self.max_grad_norm == 0:
            self.max_grad_norm = None
        checks = [
            (self.lr > 0, "--lr must be positive"),
            # --min-lr only shapes the cosine, so it is only checked against --lr when --total-steps sets one.
            (self.min_lr >= 0 and (self.total_steps is None or self.min_lr <= self.lr),
             "--min-lr must be between 0 and --lr"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.total_steps is None or self.total_steps > self.warmup_steps,
             "--total-steps must be greater than --warmup-steps (or left unset for no decay)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "--betas takes two values in [0, 1)"),
            (self.eps > 0, "eps must be positive"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "--clip-grad must be positive (or 0 to disable)"),
            (0 < self.ema_decay < 1, "--ema-decay must be in (0, 1)"),
            (self.blur_steps >= 0, "--blur-steps must be >= 0 (0 disables the blur curriculum)"),
            (self.blur_sigma >= 0, "--blur-sigma must be >= 0"),
            (self.blur_fraction_start is None or 0 < self.blur_fraction_start <= 1,
             "--blur-fraction-start must be in (0, 1]"),
            (not self.lerac or self.lerac_steps >= 1, "--lerac-steps must be >= 1 with --lerac"),
            (self.lerac_factor >= 1, "--lerac-factor must be >= 1"),
            (self.lerac_min_lr > 0 and (not self.lerac or self.lerac_min_lr <= self.lr),
             "--lerac-min-lr must be positive and at most --lr"),
            (self.lerac_granularity in LERAC_GRANULARITIES,
             f"--lerac-granularity is one of {', '.join(LERAC_GRANULARITIES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def min_lr_ratio(self) -> float:
        return self.min_lr / self.lr


def add_recipe_arguments(parser: argparse.ArgumentParser, defaults: Optional[RecipeConfig] = None) -> None:
    """Add the recipe's flags, except --lr, --weight-decay and --warmup-steps, which peer/cli.py already has."""
    d = defaults or RecipeConfig()
    g = parser.add_argument_group("training recipe (every peer of a run must use the same values)")
    g.add_argument("--total-steps", type=int, default=d.total_steps,
                   help="cosine-decay the lr to --min-lr at this global step (default: constant after warm-up)")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="the cosine schedule's final lr")
    g.add_argument("--betas", type=float, nargs=2, default=list(d.betas), metavar=("BETA1", "BETA2"))
    g.add_argument("--clip-grad", type=float, default=d.max_grad_norm if d.max_grad_norm is not None else 0.0,
                   help="clip the averaged gradient to this global L2 norm (0: off)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=d.ema,
                   help="keep an exponential moving average of the weights")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay per global step")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=d.ema_warmup,
                   help="EMA decay min(decay, (1+t)/(10+t)) so early steps are not dominated by the init")
    g.add_argument("--ema-device", default=d.ema_device, help="where the EMA lives (cpu saves GPU memory)")
    g.add_argument("--blur-steps", type=int, default=d.blur_steps,
                   help="blur curriculum: Gaussian sigma falls linearly to 0 over these global steps (0: off)")
    g.add_argument("--blur-sigma", type=float, default=d.blur_sigma, help="blur sigma in pixels at step 0")
    g.add_argument("--blur-fraction-start", type=float, default=d.blur_fraction_start,
                   help="blur only this fraction of each batch at step 0, shrinking linearly to 0 (default: all)")
    g.add_argument("--lerac", action="store_true", help="LeRaC: deeper layers start at lower learning rates")
    g.add_argument("--lerac-steps", type=int, default=d.lerac_steps,
                   help="global steps over which every layer's lr rises to --lr")
    g.add_argument("--lerac-factor", type=float, default=d.lerac_factor,
                   help="each layer group starts this factor lower than the one before it")
    g.add_argument("--lerac-min-lr", type=float, default=d.lerac_min_lr, help="floor of the initial per-layer lr")
    g.add_argument("--lerac-granularity", choices=LERAC_GRANULARITIES, default=d.lerac_granularity,
                   help="a LeRaC layer group is one block (stem, blocks, head) or one stage")


def recipe_from_args(args: argparse.Namespace) -> RecipeConfig:
    """Build the RecipeConfig from parsed flags (``add_recipe_arguments`` plus --lr/--weight-decay/--warmup-steps)."""
    return RecipeConfig(
        lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, total_steps=args.total_steps,
        min_lr=args.min_lr, betas=tuple(args.betas), max_grad_norm=args.clip_grad or None, ema=args.ema,
        ema_decay=args.ema_decay, ema_warmup=args.ema_warmup, ema_device=args.ema_device, blur_steps=args.blur_steps,
        blur_sigma=args.blur_sigma, blur_fraction_start=args.blur_fraction_start, lerac=args.lerac,
        lerac_steps=args.lerac_steps, lerac_factor=args.lerac_factor, lerac_min_lr=args.lerac_min_lr,
        lerac_granularity=args.lerac_granularity,
    )


# --------------------------------------------------------------------------------------------------------------
# 1. Learning-rate schedule
# --------------------------------------------------------------------------------------------------------------


def lr_factor(step: int, warmup_steps: int, total_steps: Optional[int] = None, min_lr_ratio: float = 0.0) -> float:
    """The lr multiplier at global step ``step``: linear warm-up, then cosine decay to ``min_lr_ratio``.

    Warm-up: ``(step + 1) / warmup_steps`` (so the very first global step is not wasted at lr 0), reaching 1
    at ``warmup_steps - 1``. With ``total_steps`` None the factor then stays 1 (ConvForever's old behaviour,
    identical to the warm-up-only schedule ConvForever had before); otherwise it follows
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2``, ``p = (step - warmup) / (total - warmup)``
    clamped to [0, 1]: 1 at the end of warm-up, ``min_lr_ratio`` from ``total_steps`` on (as ConvNeXt's
    ``utils.cosine_scheduler``, per global step instead of per iteration).
    """
    if total_steps is None or step < warmup_steps:
        return min(1.0, (step + 1) / max(warmup_steps, 1))
    progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lerac_ratio(step: int, start_ratio: float, lerac_steps: int) -> float:
    """LeRaC's multiplier for a group that starts at ``start_ratio * lr``: geometric rise to 1 at ``lerac_steps``.

    ``start_ratio ** (1 - min(step, k) / k)``, i.e. the paper's ``eta_j(t) = eta_j(0) * c ** ((t / k) *
    (log_c eta0 - log_c eta_j(0)))`` divided by ``eta0`` (the base ``c`` cancels out).
    """
    if lerac_steps <= 0 or start_ratio >= 1.0:
        return 1.0
    return start_ratio ** (1.0 - min(step, lerac_steps) / lerac_steps)


@dataclass(frozen=True)
class LrLambda:
    """One param group's ``lr_lambda`` for ``torch.optim.lr_scheduler.LambdaLR`` (a picklable callable).

    LambdaLR multiplies the group's *initial* lr by this. A LeRaC group's initial lr is already
    ``start_ratio * lr`` (``lerac_param_groups``), so the LeRaC part here is ``lerac_ratio / start_ratio``
    and the group's effective lr is ``lr * lr_factor(step) * lerac_ratio(step)``.
    """

    warmup_steps: int
    total_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    start_ratio: float = 1.0
    lerac_steps: int = 0

    def __call__(self, step: int) -> float:
        factor = lr_factor(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)
        if self.start_ratio < 1.0:
            factor *= lerac_ratio(step, self.start_ratio, self.lerac_steps) / self.start_ratio
        return factor


# --------------------------------------------------------------------------------------------------------------
# 2. Gradient clipping of the averaged gradient
# --------------------------------------------------------------------------------------------------------------


def _total_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()).to(device) for g in grads]))


def clipped(optimizer_cls: type[torch.optim.Optimizer], max_norm: Optional[float] = 5.0) -> type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_cls`` whose ``step()`` first clips the global L2 norm of every ``p.grad``.

    Why a subclass and not a clip in the training loop: under hivemind the loop never sees the gradient
    that is applied. ``hivemind.Optimizer`` accumulates local gradients, all-reduces them, writes the
    average into the wrapped optimizer's ``p.grad`` and calls its ``step()`` (see the module docstring), so
    only the wrapped optimizer can clip the averaged gradient. It works for any optimizer whose ``step()``
    reads ``p.grad`` (torch AdamW, ``bitsandbytes.optim.AdamW8bit``, SGD, ...).

    Extra constructor keywords: ``max_grad_norm`` (default ``max_norm``; None: only measure) and
    ``skip_nonfinite`` (default True: a NaN/inf averaged gradient skips the update instead of writing NaN
    into the weights; every peer receives the same average, so every peer skips it). Attributes after a
    step: ``last_grad_norm`` (float, the norm *before* clipping), ``clipped_steps``, ``skipped_steps``.
    """

    class Clipped(optimizer_cls):  # type: ignore[valid-type, misc]
        def __init__(self, params: Any, *args: Any, max_grad_norm: Optional[float] = max_norm,
                     skip_nonfinite: bool = True, **kwargs: Any) -> None:
            # Plain attributes, not optimizer defaults: they would otherwise land in every param group and in
            # the state hivemind serialises and exchanges with peers.
            self.max_grad_norm = max_grad_norm if max_grad_norm else None
            self.skip_nonfinite = skip_nonfinite
            self.last_grad_norm = math.nan
            self.clipped_steps = 0
            self.skipped_steps = 0
            super().__init__(params, *args, **kwargs)

        def step(self, closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
            loss = None
            if closure is not None:  # the gradients must exist before they can be clipped
                with torch.enable_grad():
                    loss = closure()
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            with torch.no_grad():
                if self.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                else:
                    norm = _total_norm([p.grad for p in params])
            self.last_grad_norm = float(norm)
            if not math.isfinite(self.last_grad_norm) and self.skip_nonfinite:
                self.skipped_steps += 1
                logger.warning(f"skipping an optimizer step: the averaged gradient's norm is {self.last_grad_norm}")
                return loss
            if self.max_grad_norm is not None and self.last_grad_norm > self.max_grad_norm:
                self.clipped_steps += 1
            super().step(**kwargs)
            return loss

    Clipped.__name__ = Clipped.__qualname__ = f"Clipped{optimizer_cls.__name__}"
    Clipped.__doc__ = f"{optimizer_cls.__name__} that clips the (averaged) gradient's norm before each step."
    return Clipped


ClippedAdamW = clipped(torch.optim.AdamW)


# --------------------------------------------------------------------------------------------------------------
# 3. EMA of the weights
# --------------------------------------------------------------------------------------------------------------


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """The EMA decay for the update at global step ``step`` (the step just completed, >= 1).

    With warm-up: ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's ``ExponentialMovingAverage``
    ``num_updates`` rule). At 0.9999 a plain EMA would still hold ~37% of the random initialisation after
    10k steps; with warm-up the average covers roughly the last tenth of training until ``decay`` takes
    over (at step ~90k for 0.9999). Keyed to the global step, so a peer that downloads the swarm's EMA
    continues with the swarm's decay. (timm's ModelEmaV3 warm-up is a different curve,
    ``1 - (1 + t / gamma) ** -power``.)
    """
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


class WeightEMA:
    """Exponential moving average of a model's state, updated once per global step (timm ModelEmaV2-like).

    Keys and shapes are the model's ``state_dict()``'s, so the average can be loaded into the same
    architecture or checkpointed as-is. Kept in fp32 on ``device`` (CPU by default: no GPU memory).

    Sharing it with the swarm: pass ``flat_tensors(flat_parameter_names(model))`` as
    ``hivemind.Optimizer(extra_tensors=...)``. hivemind then averages it with the parameters every
    ``average_state_every`` steps, sends it to peers that download the state (so a newcomer gets the
    swarm's EMA, not one that starts at its own step) and serves it to the coordinator right after the
    parameters, in the same order. Then construct with ``reset_on_jump=False``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True,
                 device: Optional[torch.device | str] = "cpu", step: int = 0, reset_on_jump: bool = True) -> None:
        self.decay, self.warmup, self.reset_on_jump = decay, warmup, reset_on_jump
        self.step = step  # the global step whose weights the average includes
        self.updates = 0
        with torch.no_grad():
            # Plain contiguous fp32 copies even of channels_last weights: hivemind flattens extra_tensors.
            self.shadow: dict[str, torch.Tensor] = {
                name: t.detach().to(device=device, dtype=torch.float32 if t.is_floating_point() else t.dtype)
                .clone(memory_format=torch.contiguous_format)
                for name, t in model.state_dict().items()
            }

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Fold the model's current weights in with the decay for global step ``step``; returns the decay."""
        decay = ema_decay(step, self.decay, self.warmup)
        for name, source in model.state_dict().items():
            target = self.shadow[name]
            if target.is_floating_point():
                target.lerp_(source.detach().to(device=target.device, dtype=target.dtype), 1.0 - decay)
            else:
                target.copy_(source)
        self.step, self.updates = step, self.updates + 1
        return decay

    @torch.no_grad()
    def reset(self, model: nn.Module, step: int) -> None:
        """Restart the average at the model's current weights (in place: hivemind may hold these tensors)."""
        for name, source in model.state_dict().items():
            self.shadow[name].copy_(source.detach())
        self.step = step

    def on_global_step(self, model: nn.Module, global_step: int) -> bool:
        """Call after every ``opt.step()``: updates once each time the swarm's step advances by one.

        A jump of more than one step means hivemind downloaded the state from peers: the model's weights
        now come from the swarm. If the EMA is shared through ``extra_tensors`` the download replaced it
        too; otherwise (``reset_on_jump``) it restarts at the downloaded weights rather than mix our
        stale ones in. Returns whether the average changed.
        """
        if global_step == self.step:
            return False
        if global_step == self.step + 1:
            self.update(model, global_step)
            return True
        if self.reset_on_jump:
            logger.info(f"weight EMA restarts at the downloaded weights (step {self.step} -> {global_step})")
            self.reset(model, global_step)
        else:
            self.step = global_step
        return self.reset_on_jump

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's own state-dict keys (same order)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state_dict)
        if missing:
            raise KeyError(f"EMA state keys differ from the model's: {sorted(missing)[:5]}")
        for name, tensor in state_dict.items():
            self.shadow[name].copy_(tensor)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. a separate evaluation copy)."""
        model.load_state_dict(self.shadow)

    def flat_tensors(self, names: Iterable[str]) -> list[torch.Tensor]:
        """The average's tensors in ``names`` order (``flat_parameter_names``) for ``extra_tensors``."""
        return [self.shadow[name] for name in names]


# --------------------------------------------------------------------------------------------------------------
# 4. Blur curriculum
# --------------------------------------------------------------------------------------------------------------


def blur_sigma(step: int, config: RecipeConfig) -> float:
    """Sigma at global step ``step``: ``blur_sigma * (1 - step / blur_steps)``, 0 from ``blur_steps`` on."""
    if config.blur_steps <= 0:
        return 0.0
    return config.blur_sigma * max(0.0, 1.0 - step / config.blur_steps)


def blur_fraction(step: int, config: RecipeConfig) -> float:
    """Fraction of each batch blurred at ``step``: 1 while sigma > 0, or ``blur_fraction_start`` falling to 0."""
    if blur_sigma(step, config) <= 0:
        return 0.0
    if config.blur_fraction_start is None:
        return 1.0
    return config.blur_fraction_start * max(0.0, 1.0 - step / config.blur_steps)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, max_radius: Optional[int] = None,
                      device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sampled, normalised Gaussian of radius ``ceil(truncate * sigma)`` (scipy.ndimage's default truncate=4).

    Truncating at 4 sigma keeps >99.99% of the mass, so the discrete kernel's variance is sigma^2 to well
    under 1% for sigma >= 1 (at 3 sigma it would be ~3% low).
    """
    radius = max(1, math.ceil(truncate * sigma))
    if max_radius is not None:
        radius = max(1, min(radius, max_radius))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``[B, C, H, W]`` float batch with reflect padding (per channel)."""
    if sigma <= 0:
        return images
    _, channels, height, width = images.shape
    # reflect padding needs pad < size; a kernel wider than the image is clipped to fit it.
    kernel = gaussian_kernel1d(sigma, max_radius=min(height, width) - 1, device=images.device, dtype=images.dtype)
    radius = (kernel.numel() - 1) // 2
    x = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def blur_count(fraction: float, batch: int, generator: Optional[torch.Generator] = None) -> int:
    """``fraction * batch`` rounded stochastically: floor or ceil, right on average even for small batches."""
    expected = min(max(fraction, 0.0), 1.0) * batch
    whole = int(expected)
    device = generator.device if generator is not None else None
    return whole + int(torch.rand((), generator=generator, device=device).item() < expected - whole)


def blur_batch(images: torch.Tensor, step: int, config: RecipeConfig,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Blur (a fraction of) a normalised batch for the curriculum at global step ``step``; run it on the GPU.

    Which images are blurred is drawn with ``generator`` (CPU or the images' device, e.g. the peer's
    ``augment_rng``); how many is ``blur_count``.
    The input is never modified; with nothing to blur it is returned as is.
    """
    sigma, fraction = blur_sigma(step, config), blur_fraction(step, config)
    if sigma <= 0 or fraction <= 0:
        return images
    batch = images.shape[0]
    if fraction >= 1.0:
        return gaussian_blur(images, sigma)
    count = blur_count(fraction, batch, generator)
    if count == 0:
        return images
    device = generator.device if generator is not None else None
    chosen = torch.randperm(batch, generator=generator, device=device)[:count].to(images.device)
    out = images.clone()
    out[chosen] = gaussian_blur(images[chosen], sigma)
    return out


# --------------------------------------------------------------------------------------------------------------
# 5. LeRaC: learning-rate curriculum
# --------------------------------------------------------------------------------------------------------------

_STAGE_PARAM = re.compile(r"^stages\.(\d+)\.(?:downsample|blocks\.(\d+))\.")


def lerac_levels(model: nn.Module, granularity: str = "block") -> dict[str, int]:
    """Each parameter's layer-group index, from 0 (the input side) up to the head.

    ``block``: stem = 0, then every block in order (stage i's downsample joins its first block), head last.
    ``stage``: stem = 0, stage i = 1 + i, head = 1 + number of stages.
    """
    if granularity not in LERAC_GRANULARITIES:
        raise ValueError(f"--lerac-granularity is one of {', '.join(LERAC_GRANULARITIES)}, got {granularity!r}")
    depths = [len(stage.blocks) for stage in model.stages]
    first_block = [1 + sum(depths[:i]) for i in range(len(depths))]
    head = 1 + (sum(depths) if granularity == "block" else len(depths))
    levels = {}
    for name, _ in model.named_parameters():
        match = _STAGE_PARAM.match(name)
        if name.startswith("stem."):
            levels[name] = 0
        elif name.startswith("head."):
            levels[name] = head
        elif match is not None:
            stage = int(match.group(1))
            block = int(match.group(2)) if match.group(2) is not None else 0
            levels[name] = first_block[stage] + block if granularity == "block" else 1 + stage
        else:
            raise ValueError(f"LeRaC does not know where parameter {name!r} sits in the network")
    return levels


def lerac_param_groups(model: nn.Module, weight_decay: float, base_lr: float, c_factor: float = 10.0,
                       eta_min: float = 1e-7, granularity: str = "block") -> list[dict[str, Any]]:
    """Optimizer param groups with LeRaC's initial learning rates, in ``param_groups``'s flat order.

    Layer group k (``lerac_levels``) starts at ``max(base_lr * c_factor ** -k, eta_min)``: the stem at
    ``base_lr``, each deeper group ``c_factor`` times lower, floored at ``eta_min``; ``lerac_lambdas`` then
    raises each to ``base_lr``. Groups are the contiguous runs of equal depth within the decay list, then
    within the no-decay list, so concatenating their params gives exactly ``param_groups(model, wd)``'s
    order: ``flat_parameter_names`` stays right for the coordinator, which reads hivemind's flat state
    tensors by it. (The number of groups does change the optimizer's state layout: every peer of a run
    must agree on --lerac.) Each group sets ``lr`` and ``weight_decay``, nothing else, so no custom key
    reaches the state that hivemind exchanges.
    """
    levels = lerac_levels(model, granularity)
    names = {id(param): name for name, param in model.named_parameters()}
    groups: list[dict[str, Any]] = []
    for plain in param_groups(model, weight_decay):  # split each of the two plain groups into runs of equal depth
        current: Optional[int] = None
        for param in plain["params"]:
            level = levels[names[id(param)]]
            if level != current:
                current = level
                lr = max(base_lr * c_factor ** -level, eta_min) if c_factor > 1 else base_lr
                groups.append({"params": [], "weight_decay": plain["weight_decay"], "lr": min(lr, base_lr)})
            groups[-1]["params"].append(param)
    return groups


def lerac_lambdas(groups: Sequence[dict[str, Any]], base_lr: float, lerac_steps: int, warmup_steps: int,
                  total_steps: Optional[int] = None, min_lr_ratio: float = 0.0) -> list[LrLambda]:
    """One ``LrLambda`` per group for ``LambdaLR(optimizer, lr_lambda=[...])``: schedule times LeRaC's rise.

    A group with initial lr ``eta_k(0) = r_k * base_lr`` runs at
    ``base_lr * lr_factor(t) * r_k ** (1 - min(t, lerac_steps) / lerac_steps)``.
    """
    return [LrLambda(warmup_steps, total_steps, min_lr_ratio, start_ratio=group["lr"] / base_lr,
                     lerac_steps=lerac_steps) for group in groups]


# --------------------------------------------------------------------------------------------------------------
# Putting it together for hivemind.Optimizer
# --------------------------------------------------------------------------------------------------------------


@dataclass
class OptimizerSetup:
    """The three arguments ``hivemind.Optimizer`` needs: ``params``, ``optimizer`` and ``scheduler`` factories."""

    params: list[dict[str, Any]]
    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]
    lambdas: list[LrLambda]


def build_optimizer_setup(model: nn.Module, config: RecipeConfig,
                          optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW) -> OptimizerSetup:
    """Param groups (plain or LeRaC), the clipping optimizer factory and the per-group LambdaLR factory."""
    if config.lerac:
        groups = lerac_param_groups(model, config.weight_decay, config.lr, config.lerac_factor, config.lerac_min_lr,
                                    config.lerac_granularity)
        lambdas = lerac_lambdas(groups, config.lr, config.lerac_steps, config.warmup_steps, config.total_steps,
                                config.min_lr_ratio)
    else:
        groups = param_groups(model, config.weight_decay)
        lambdas = [LrLambda(config.warmup_steps, config.total_steps, config.min_lr_ratio) for _ in groups]
    optimizer = partial(clipped(optimizer_cls), lr=config.lr, betas=config.betas, eps=config.eps,
                        max_grad_norm=config.max_grad_norm)
    scheduler = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambdas)
    return OptimizerSetup(params=groups, optimizer=optimizer, scheduler=scheduler, lambdas=lambdas)
