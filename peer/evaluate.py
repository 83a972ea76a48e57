"""`convforever-eval`: top-1/top-5 of a checkpoint on a dataset, as JSON on stdout."""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter

import torch

from convforever.data import DataConfig, make_loader
from convforever.model.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: torch.nn.Module, config: DataConfig, device: torch.device) -> dict:
    """One ordered pass with the eval transform; rows the data layer skips are counted, not scored."""
    model.eval().to(device)
    correct1 = correct5 = samples = 0
    skipped: Counter = Counter()
    for batch in make_loader(config):
        logits = model(batch.images.to(device))
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        labels = batch.labels.view(-1, 1)
        correct1 += (top5[:, :1] == labels).any(dim=1).sum().item()
        correct5 += (top5 == labels).any(dim=1).sum().item()
        samples += len(labels)
        skipped.update(batch.skipped)
    return {
        "top1": correct1 / samples if samples else 0.0,
        "top5": correct5 / samples if samples else 0.0,
        "samples": samples,
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="convforever-eval", description="Evaluate a ConvForever checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a step-N folder or a checkpoint root with 'latest'")
    p.add_argument("--data", required=True, help="parquet file, directory or glob in the PD-Extended schema")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--image-size", type=int, help="default: the size the checkpoint was trained at")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        model, config = load_checkpoint(args.checkpoint)
        data = DataConfig(files=args.data, image_size=args.image_size or config["image_size"], batch_size=args.batch_size,
                          train=False, num_workers=args.num_workers)
        result = evaluate(model, data, torch.device(args.device))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"convforever-eval: error: {e}") from None
    result.update(checkpoint_step=config.get("step"), model=config["model"]["name"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
