"""Checkpoints as safetensors + JSON: never a pickle, so loading one from a stranger is safe.

Layout of a checkpoint root (what the coordinator writes and `convforever-eval` reads)::

    ROOT/step-40/model.safetensors   weights, timm-compatible key names
    ROOT/step-40/config.json         model config, class names, image size, step, loss, ...
    ROOT/latest                      the text "step-40"

A step folder is written under a temporary name and renamed into place, and `latest` is replaced
with `os.replace`, so a crash half-way leaves the previous checkpoint and pointer valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import ConvNeXt, ModelConfig, create_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LATEST_NAME = "latest"
FORMAT_VERSION = 1


def save_checkpoint(root: str | os.PathLike, step: int, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``root/step-{step}`` atomically and point ``root/latest`` at it; returns the step folder.

    `meta` must hold at least ``model`` (a `ModelConfig.to_dict()`); it is stored as config.json
    together with the step and the format version.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}-", dir=root))
    try:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = dict(meta, step=step, format_version=FORMAT_VERSION)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
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


def load_checkpoint(path: str | os.PathLike) -> tuple[ConvNeXt, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights; returns (model, config)."""
    step_dir = resolve_checkpoint(path)
    config = json.loads((step_dir / CONFIG_NAME).read_text())
    model = create_model(ModelConfig.from_dict(config["model"]))
    model.load_state_dict(load_file(str(step_dir / WEIGHTS_NAME)), strict=True)
    return model, config
