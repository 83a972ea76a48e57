"""Checkpoints in timm's Hub layout, `convforever-eval --image`, checkpoint specs, and `--init-from`.

The Hub round trip (upload by the coordinator, download by revision) is in test_hub.py; here the
checkpoints are local folders and the CLIs run as real subprocesses.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from convforever.data import CATEGORIES, IMAGENET_MEAN, IMAGENET_STD, write_demo_dataset
from convforever.data.images import EVAL_CROP_PCT
from convforever.model import ModelConfig, create_model
from convforever.model import checkpoint as ckpt


def _save(root: Path, step: int, num_classes: int = 50, image_size: int = 32) -> torch.nn.Module:
    torch.manual_seed(step)
    model = create_model(ModelConfig(name="convnext_atto", num_classes=num_classes))
    meta = {"model": model.config.to_dict(), "image_size": image_size, "class_names": list(CATEGORIES[:num_classes]),
            "run_id": "t", "loss": 1.5}
    ckpt.save_checkpoint(root, step, model.state_dict(), meta)
    return model


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_config_json_is_timms_hub_format_with_our_record(tmp_path):
    _save(tmp_path, 4, image_size=64)
    config = json.loads((tmp_path / "step-4" / "config.json").read_text())
    assert config["architecture"] == "convnext_atto" and config["num_classes"] == 50
    assert config["model_args"] == {"depths": [2, 2, 6, 2], "dims": [40, 80, 160, 320]}
    pre = config["pretrained_cfg"]
    # timm preprocesses exactly as our eval transform does: same statistics, crop and size.
    assert pre["mean"] == list(IMAGENET_MEAN) and pre["std"] == list(IMAGENET_STD)
    assert pre["crop_pct"] == EVAL_CROP_PCT and pre["input_size"] == [3, 64, 64]
    assert pre["label_names"] == config["label_names"] == list(CATEGORIES)
    assert pre["first_conv"] == "stem.0" and pre["classifier"] == "head.fc"
    ours = config["convforever"]
    assert ours["step"] == 4 and ours["format_version"] == 2 and ours["run_id"] == "t"
    model, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["step"] == 4 and model.config.name == "convnext_atto"


def test_format_1_checkpoints_still_load(tmp_path):
    model = _save(tmp_path, 2)
    step_dir = tmp_path / "step-2"
    old = json.loads((step_dir / "config.json").read_text())["convforever"] | {"format_version": 1}
    (step_dir / "config.json").write_text(json.dumps(old))
    loaded, meta = ckpt.load_checkpoint(step_dir)
    assert meta["format_version"] == 1
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_checkpoint_specs(tmp_path):
    _save(tmp_path, 3)
    _save(tmp_path, 6)
    assert ckpt.fetch_checkpoint(tmp_path) == tmp_path / "step-6"  # follows latest
    assert ckpt.fetch_checkpoint(f"{tmp_path}@step-3") == tmp_path / "step-3"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.fetch_checkpoint(f"{tmp_path}@step-9")
    with pytest.raises(FileNotFoundError, match="ORG/REPO"):
        ckpt.fetch_checkpoint(tmp_path / "missing" / "deeper")


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def test_eval_image_prints_top5_categories(tmp_path):
    _save(tmp_path / "ckpt", 5)
    image = _png(tmp_path / "x.png", (200, 30, 30))
    result = run("convforever.peer.evaluate", "--checkpoint", f"{tmp_path / 'ckpt'}@step-5", "--image", str(image))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5 and [line.split(".")[0] for line in lines] == ["1", "2", "3", "4", "5"]
    names = [line.split()[1] for line in lines]
    probs = [float(line.split()[-1].rstrip("%")) for line in lines]
    assert set(names) <= set(CATEGORIES) and probs == sorted(probs, reverse=True) and sum(probs) <= 100.01


@pytest.mark.parametrize("bad, message", [("missing.png", "No such file"), ("garbage.png", "not a usable image")])
def test_eval_image_errors_say_what_is_wrong(tmp_path, bad, message):
    _save(tmp_path / "ckpt", 1)
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    result = run("convforever.peer.evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / bad))
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_eval_needs_data_or_image(tmp_path):
    result = run("convforever.peer.evaluate", "--checkpoint", str(tmp_path))
    assert result.returncode == 2 and "--data" in result.stderr and "--image" in result.stderr


@pytest.mark.slow
def test_init_from_loads_the_checkpoint_and_refuses_another_architecture(tmp_path):
    demo = write_demo_dataset(tmp_path / "data", train_rows=64, eval_rows=8, image_size=32, num_shards=1)
    _save(tmp_path / "ckpt", 7)
    common = ["convforever.peer.cli", "--run-id", "init", "--data", str(Path(demo.train_files[0]).parent),
              "--image-size", "32", "--batch-size", "8", "--target-batch-size", "8", "--max-steps", "1",
              "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--num-workers", "0", "--exit-grace", "0",
              "--save-on-exit", str(tmp_path / "out")]
    wrong = run(*common, "--model", "convnext_femto", "--init-from", f"{tmp_path / 'ckpt'}@step-7")
    assert wrong.returncode != 0 and "pass the same --model" in wrong.stderr and "Traceback" not in wrong.stderr
    right = run(*common, "--model", "convnext_atto", "--init-from", f"{tmp_path / 'ckpt'}@step-7", "--lr", "1e-9")
    assert right.returncode == 0, right.stderr
    assert "initialised from" in right.stderr and "(its step 7)" in right.stderr
    # One step at a negligible learning rate: the saved weights are still the checkpoint's.
    start, _ = ckpt.load_checkpoint(f"{tmp_path / 'ckpt'}@step-7")
    end, _ = ckpt.load_checkpoint(tmp_path / "out")
    for name, tensor in start.state_dict().items():
        assert torch.allclose(end.state_dict()[name], tensor, atol=1e-4), name
