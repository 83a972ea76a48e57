"""Check that timm loads our checkpoints from a Hub repository: ``timm.create_model("hf-hub:ORG/REPO@step-N")``.

timm needs torchvision, and PyPI's torchvision does not import beside the CPU torch build our CI uses, so
timm runs in a second Python (``--timm-python``, any environment with timm installed; nothing of ours is
needed there). This script publishes checkpoints of several architectures with the coordinator's own
uploader to the Hub-API server of tests/hub_server.py on 127.0.0.1, then asks timm, in that Python, to build
and load each one by revision, and compares logits on the same input with our model's.

    python -m venv /tmp/timmvenv && /tmp/timmvenv/bin/pip install torch torchvision timm
    .venv/bin/python bench/timm_compat.py --timm-python /tmp/timmvenv/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hub_server import HubServer  # noqa: E402
from results import append_results  # noqa: E402

CASES = [("convnext_atto", None, 64), ("convnext_tiny", 8, 64), ("convnextv2_atto", None, 96)]

TIMM_CODE = """
import json, sys, torch, timm
out = []
for repo, step, path in json.loads(sys.argv[1]):
    model = timm.create_model(f"hf-hub:{repo}@step-{step}", pretrained=True).eval()
    io = torch.load(path)
    with torch.no_grad():
        diff = (model(io["x"]) - io["y"]).abs().max().item()
    out.append(dict(repo=repo, timm=timm.__version__, torch=torch.__version__, input_size=model.pretrained_cfg["input_size"],
                    labels=len(model.pretrained_cfg.get("label_names", [])), max_abs_diff=diff))
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm-python", required=True, help="a Python interpreter with timm installed")
    p.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="timm-compat-"))
    with HubServer(tmp / "storage") as hub:
        os.environ.update(hub.client_env(tmp / "hf-home"))  # before huggingface_hub is imported below
        from convforever.coordinator.hub import HubConfig, HubPublisher, Upload
        from convforever.data import CATEGORIES
        from convforever.model import ModelConfig, create_model
        from convforever.model import checkpoint as ckpt

        jobs = []
        for i, (name, depth, size) in enumerate(CASES):
            torch.manual_seed(i)
            model = create_model(ModelConfig(name=name, depth=depth)).eval()
            meta = {"model": model.config.to_dict(), "image_size": size, "class_names": list(CATEGORIES)}
            step_dir = ckpt.save_checkpoint(tmp / name, 7, model.state_dict(), meta)
            repo = f"org/ConvForever-{name}"
            publisher = HubPublisher(HubConfig(repo))
            publisher.submit(Upload(7, step_dir, 1.0, "card", b""))
            while publisher.published != [7] and publisher.last_error is None:
                time.sleep(0.1)
            publisher.close()
            if publisher.last_error:
                raise SystemExit(f"upload failed: {publisher.last_error}")
            x = torch.randn(2, 3, size, size)
            with torch.no_grad():
                torch.save({"x": x, "y": model(x)}, tmp / f"{name}.pt")
            jobs.append((repo, 7, str(tmp / f"{name}.pt")))
        result = subprocess.run([args.timm_python, "-c", TIMM_CODE, json.dumps(jobs)], capture_output=True, text=True,
                                env={**os.environ}, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"timm failed:\n{result.stderr[-3000:]}")
    rows = json.loads(result.stdout)
    lines = ["| checkpoint | depths | input | labels | max abs logit diff vs ours |", "|---|---|---|---:|---:|"]
    for (name, depth, _), row in zip(CASES, rows):
        lines.append(f"| `{row['repo']}@step-7` | {'preset' if depth is None else f'depth={depth}'} | "
                     f"{row['input_size']} | {row['labels']} | {row['max_abs_diff']:.2e} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        section = (f"\n## timm loads our Hub checkpoints ({datetime.date.today()})\n\n"
                   f"`{' '.join(['.venv/bin/python', 'bench/timm_compat.py', '--timm-python', args.timm_python])}`: "
                   f"our coordinator's uploader publishes to tests/hub_server.py; timm {rows[0]['timm']} "
                   f"(torch {rows[0]['torch']}) in a second environment runs `timm.create_model(\"hf-hub:REPO@step-7\", "
                   "pretrained=True)` and compares logits on the same input.\n\n" + table + "\n")
        append_results(section)


if __name__ == "__main__":
    main()
