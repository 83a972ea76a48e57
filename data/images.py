"""Decoding untrusted image bytes and the train/eval transforms, with Pillow and torch only.

Transforms return uint8 (3, S, S) tensors; ``normalize`` turns a stacked batch into float32 once in the
main process, so DataLoader workers ship a quarter of the bytes through shared memory.
"""

from __future__ import annotations

import io
import math
import random
import struct
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# timm's ConvNeXt evaluation: resize the shorter side to size / 0.875, then centre-crop.
EVAL_CROP_PCT = 0.875
CROP_RATIO = (3 / 4, 4 / 3)

# What Pillow raises on malformed or truncated input, depending on the codec; anything else is a bug.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError)


class UnusableImage(Exception):
    """An image row to skip; ``reason`` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes | None, *, max_pixels: int, min_side: int = 0) -> Image.Image:
    """Decode to an RGB image, or raise UnusableImage("no_image" | "too_large" | "corrupt_image").

    The pixel cap is checked on the header before any pixel is decoded, so a small file claiming huge
    dimensions costs nothing; Pillow's own global bomb limit (``Image.MAX_IMAGE_PIXELS``) is left alone
    for other code and its warning/error are reported as "too_large" too. ``min_side`` lets JPEGs decode
    at a reduced DCT scale that still leaves the shorter side >= min_side: much faster for the multi-
    megapixel photos in PD-Extended when training at 64-224 px.
    """
    if not data:
        raise UnusableImage("no_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise UnusableImage("too_large", f"{width}x{height} > {max_pixels} pixels")
            if min_side > 0:
                image.draft(None, (min_side, min_side))
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnusableImage("too_large", str(error)) from error
    except _DECODE_ERRORS as error:
        raise UnusableImage("corrupt_image", f"{type(error).__name__}: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (converting RGBA straight to RGB shows hidden colour)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_min_side(image_size: int, train: bool, min_crop_scale: float) -> int:
    """Smallest source shorter side that still gives the transforms native resolution."""
    if train:
        return math.ceil(image_size / math.sqrt(min_crop_scale))
    return math.ceil(image_size / EVAL_CROP_PCT)


def random_crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float],
                    ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """Inception-style random crop: area fraction in ``scale``, aspect ratio log-uniform in ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback after 10 misses (extreme aspect ratios): the largest central crop within ``ratio``.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 from an RGB image."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def train_transform(image: Image.Image, size: int, rng: random.Random,
                    scale: tuple[float, float] = (0.08, 1.0),
                    augment: Callable[[Image.Image, random.Random], Image.Image] | None = None) -> torch.Tensor:
    """Random resized crop + horizontal flip [+ ``augment``] -> uint8 (3, size, size).

    ``augment`` (e.g. ``augment.RandAugment``) runs on the cropped, flipped PIL image with the same ``rng``,
    as timm orders its train transforms; it must keep the size and RGB mode.
    """
    box = random_crop_box(image.width, image.height, rng, scale)
    # Crop and resize in one resampling pass (Pillow's ``box``), rather than crop() then resize().
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if augment is not None:
        out = augment(out, rng)
    return to_uint8_tensor(out)


def eval_transform(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to size / 0.875, centre-crop size x size -> uint8 (3, size, size).

    Done as one resample of the matching source box, which equals resize-then-crop up to rounding.
    """
    width, height = image.size
    side = min(width, height) * EVAL_CROP_PCT  # source pixels that end up in the crop
    left, top = (width - side) / 2, (height - side) / 2
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return to_uint8_tensor(out)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 normalised with the ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)
