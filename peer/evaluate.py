"""`convforever-eval`: top-1/top-5 and loss of a checkpoint on a dataset (JSON on stdout), or the top-5
categories of one image. Checkpoints come from a local folder or a Hugging Face Hub repository."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter

import torch

from convforever.data import DataConfig, make_loader
from convforever.data.images import UnusableImage, decode_image, eval_transform, normalize
from convforever.model.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: torch.nn.Module, config: DataConfig, device: torch.device) -> dict:
    """One ordered pass with the eval transform; rows the data layer skips are counted, not scored. ``loss`` is the
    mean cross-entropy, which moves before top-1 does on a short run."""
    model.eval().to(device)
    correct1 = correct5 = samples = 0
    loss_sum = 0.0
    skipped: Counter = Counter()
    for batch in make_loader(config):
        logits = model(batch.images.to(device))
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), batch.labels.to(device), reduction="sum").item()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        labels = batch.labels.view(-1, 1)
        correct1 += (top5[:, :1] == labels).any(dim=1).sum().item()
        correct5 += (top5 == labels).any(dim=1).sum().item()
        samples += len(labels)
        skipped.update(batch.skipped)
    return {
        "top1": correct1 / samples if samples else 0.0,
        "top5": correct5 / samples if samples else 0.0,
        "loss": loss_sum / samples if samples else math.nan,
        "samples": samples,
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped),
    }


@torch.no_grad()
def classify_image(model: torch.nn.Module, path: str, image_size: int, class_names: list[str],
                   device: torch.device, k: int = 5) -> list[tuple[str, float]]:
    """The top-k (category, probability) of one image file, through the same eval transform as `evaluate`."""
    try:
        with open(path, "rb") as f:
            image = decode_image(f.read(), max_pixels=DataConfig().max_image_pixels)
    except OSError as e:
        raise ValueError(f"--image {path}: {e.strerror or e}") from None
    except UnusableImage as e:
        raise ValueError(f"--image {path} is not a usable image ({e.reason}: {e})") from None
    batch = normalize(eval_transform(image, image_size)).unsqueeze(0).to(device)
    probs = model.eval().to(device)(batch).softmax(dim=1)[0].cpu()
    top = probs.topk(min(k, probs.numel()))
    names = list(class_names) + [f"class {i}" for i in range(len(class_names), probs.numel())]
    return [(names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="convforever-eval", description="Evaluate a ConvForever checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="DIR (a step-N folder or a checkpoint root with 'latest'), DIR@step-N, or a Hub model "
                        "repository ORG/REPO[@REVISION] (a branch, a step-N tag or a commit)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--data", help="parquet/jsonl file, directory, glob or ImageFolder to score top-1/top-5 on")
    target.add_argument("--image", help="print the top-5 categories of this image file")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA of the weights (model_ema.safetensors)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--image-size", type=int, help="default: the size the checkpoint was trained at")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        model, config = load_checkpoint(args.checkpoint, ema=args.ema)
        if args.image:
            image_size = args.image_size or config["image_size"]
            for rank, (name, prob) in enumerate(classify_image(model, args.image, image_size, config["class_names"],
                                                               torch.device(args.device)), 1):
                print(f"{rank}. {name:<14} {prob:7.2%}")
            return
        data = DataConfig(files=args.data, image_size=args.image_size or config["image_size"], batch_size=args.batch_size,
                          train=False, num_workers=args.num_workers, num_classes=config["model"]["num_classes"])
        result = evaluate(model, data, torch.device(args.device))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"convforever-eval: error: {e}") from None
    result.update(checkpoint_step=config.get("step"), model=config["model"]["name"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
