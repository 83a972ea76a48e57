"""Checkpoints as safetensors + JSON: never a pickle, so loading one from a stranger is safe.

Layout of a checkpoint root (what the coordinator writes and `convforever-eval` reads)::

    ROOT/step-40/model.safetensors   weights, timm-compatible key names
    ROOT/step-40/config.json         timm's Hub config + our own record under "convforever"
    ROOT/latest                      the text "step-40"

A step folder is exactly what a Hugging Face Hub model repository holds, so the local folder and
the Hub share one layout: ``config.json`` carries the fields timm's ``create_model("hf-hub:...")``
reads (``architecture``, ``num_classes``, ``model_args`` with depths and dims, ``pretrained_cfg`` with
the input size, mean/std and label names), and our run's own record (model config, step, loss, run
id, ...) under the ``"convforever"`` key, which timm ignores.

A step folder is written under a temporary name and renamed into place, and `latest` is replaced
with `os.replace`, so a crash half-way leaves the previous checkpoint and pointer valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import ConvNeXt, ModelConfig, create_model

WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "model_ema.safetensors"  # the EMA of the weights, when the run keeps one
CONFIG_NAME = "config.json"
LATEST_NAME = "latest"
FORMAT_VERSION = 2  # 1: our record at the top level of config.json (still read); 2: timm's layout


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for the model: timm's ``pretrained_cfg`` fields. The data layer owns
    the numbers (``convforever.data.images``); callers pass them so model/ stays free of data code."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str = "bicubic"


def timm_config(config: ModelConfig, image_size: int, class_names: list[str], prep: Preprocessing) -> dict[str, Any]:
    """The config.json fields timm reads in ``create_model("hf-hub:ORG/REPO", pretrained=True)``."""
    return {
        "architecture": config.name,
        "num_classes": config.num_classes,
        "num_features": config.dims[-1],
        "global_pool": "avg",
        "label_names": list(class_names),
        "model_args": {"depths": list(config.depths), "dims": list(config.dims)},
        "pretrained_cfg": {
            "input_size": [config.in_chans, image_size, image_size],
            "fixed_input_size": False,
            "interpolation": prep.interpolation,
            "crop_pct": prep.crop_pct,
            "crop_mode": "center",
            "mean": list(prep.mean),
            "std": list(prep.std),
            "num_classes": config.num_classes,
            "pool_size": [max(image_size // 32, 1)] * 2,
            "first_conv": "stem.0",
            "classifier": "head.fc",
            "label_names": list(class_names),
        },
    }


def save_checkpoint(root: str | os.PathLike, step: int, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
                    prep: Preprocessing | None = None, ema_state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``root/step-{step}`` atomically and point ``root/latest`` at it; returns the step folder.

    `meta` must hold at least ``model`` (a `ModelConfig.to_dict()`), ``image_size`` and ``class_names``;
    it is stored under config.json's "convforever" key with the step and the format version, next to
    timm's fields (built with ``prep``, ImageNet's statistics when None).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}-", dir=root))
    try:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if ema_state_dict is not None:
            ema = {name: t.detach().to("cpu").contiguous() for name, t in ema_state_dict.items()}
            save_file(ema, str(tmp / EMA_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(checkpoint_config(step, meta, prep), indent=2))
        if final.exists():  # the same step saved twice (e.g. after a restart): the newer state wins
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = root / f".{LATEST_NAME}.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / LATEST_NAME)
    return final


IMAGENET_PREPROCESSING = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875)


def checkpoint_config(step: int, meta: dict[str, Any], prep: Preprocessing | None = None) -> dict[str, Any]:
    """config.json's content: timm's fields first, then our record."""
    model_config = ModelConfig.from_dict(meta["model"])
    ours = dict(meta, step=step, format_version=FORMAT_VERSION)
    return {**timm_config(model_config, int(meta["image_size"]), list(meta["class_names"]), prep or IMAGENET_PREPROCESSING),
            "convforever": ours}


def read_config(step_dir: Path) -> dict[str, Any]:
    """Our record from a step folder's config.json, in either format version."""
    config = json.loads((step_dir / CONFIG_NAME).read_text())
    return config["convforever"] if "convforever" in config else config


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a step folder or a checkpoint root (follows ``latest``); fail with what to pass instead."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file():
        return path
    if (path / LATEST_NAME).is_file():
        step_dir = path / (path / LATEST_NAME).read_text().strip()
        if (step_dir / WEIGHTS_NAME).is_file():
            return step_dir
        raise FileNotFoundError(f"{path / LATEST_NAME} points at {step_dir}, which has no {WEIGHTS_NAME}")
    raise FileNotFoundError(
        f"no checkpoint at {path}: pass a folder holding {WEIGHTS_NAME} + {CONFIG_NAME}, "
        f"or a checkpoint root with a '{LATEST_NAME}' file (the coordinator's --checkpoint-dir)"
    )


def fetch_checkpoint(spec: str | os.PathLike) -> Path:
    """A local step folder for ``DIR``, ``DIR@step-N``, ``ORG/REPO`` or ``ORG/REPO@REVISION`` (a Hub model
    repository: a branch, a tag such as ``step-40``, or a commit; downloaded with huggingface_hub)."""
    text = os.fspath(spec)
    base, _, revision = text.partition("@")
    if Path(text).exists() or Path(base).exists():
        path = Path(base) / revision if revision and not Path(text).exists() else Path(text)
        return resolve_checkpoint(path)
    if base.count("/") != 1 or not all(base.split("/")):
        raise FileNotFoundError(f"no checkpoint at {text!r}: not a local folder, and not a Hub repository "
                                "name ORG/REPO[@REVISION]")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        local = snapshot_download(base, revision=revision or None,
                                  allow_patterns=[WEIGHTS_NAME, EMA_WEIGHTS_NAME, CONFIG_NAME])
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"the Hub has no model repository {base!r} (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{base!r} has no revision {revision!r}; checkpoints are tagged step-N") from None
    except (HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(f"could not download {text!r} from the Hub: {e}") from None
    return resolve_checkpoint(local)


def load_checkpoint(path: str | os.PathLike, ema: bool = False) -> tuple[ConvNeXt, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights (or, with ``ema``, their EMA).

    ``path`` is anything `fetch_checkpoint` accepts: a local folder or a Hub repository, with a revision.
    """
    step_dir = fetch_checkpoint(path)
    config = read_config(step_dir)
    model = create_model(ModelConfig.from_dict(config["model"]))
    weights = step_dir / (EMA_WEIGHTS_NAME if ema else WEIGHTS_NAME)
    if not weights.is_file():
        raise FileNotFoundError(f"{step_dir} has no {weights.name}" + (" (the run kept no EMA)" if ema else ""))
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model, config
