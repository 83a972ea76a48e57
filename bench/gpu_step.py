"""The pieces of bench/gpu_check.sh, one subcommand each, each writing one JSON file; ``report`` joins them.

    python bench/gpu_step.py env        --out DIR/env.json
    python bench/gpu_step.py throughput --out DIR/throughput.json [--batch 128] [--compile]
    python bench/gpu_step.py memory     --out DIR/memory.json [--batch 64] [--fit-gb 8]
    python bench/gpu_step.py timm-load  --out DIR/timm.json
    python bench/gpu_step.py report     --dir DIR [--append]

Our peer's local step is built from the peer's own code where it imports (``convforever.peer.accel``:
precision, channels_last, torch.compile, checkpointing, 8-bit AdamW; ``convforever.peer.recipe``: the
param groups and the clipping AdamW the swarm steps), and mirrors ``Peer.train_step``: images in the peer's
memory format, forward under autocast, cross-entropy, backward, optimizer step, zero_grad, ``loss.item()``.
Not measured: hivemind (a single card has no swarm; ``hivemind.Optimizer`` steps the wrapped AdamW once per
target batch, so stepping it after every micro-batch, as here, is the costlier case), the data pipeline (both
loops train on the same batch, already on the card), augmentation (MixUp/CutMix on the card, off here for
both) and the weight EMA (once per global step, on the CPU). When ``convforever.peer`` does not import, a
copy of the same step is used and the JSON says so. No network and no install are needed: the checkout's
``model/`` and ``peer/`` are imported from source if the package is not installed (``depth_memory.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from depth_memory import ensure_convforever, markdown, ratios  # noqa: E402

ensure_convforever()
from convforever.model import ModelConfig, create_model  # noqa: E402
from results import RESULTS, append_results  # noqa: E402

GiB = 2**30


def log(msg: str) -> None:
    print(f"[gpu_step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def try_import(name: str):
    try:
        return __import__(name), None
    except Exception as e:  # noqa: BLE001 - a broken CUDA setup raises anything at import (bitsandbytes)
        return None, f"{type(e).__name__}: {e}"


# --- the two training steps --------------------------------------------------------------------------------


class OurStep:
    """The peer's local step for ``ModelConfig(name, num_classes)`` (see the module docstring)."""

    def __init__(self, name: str, num_classes: int, device: torch.device, *, precision: str = "auto",
                 channels_last: bool | None = None, compile: bool = False, checkpointing: bool = False,
                 optimizer: str = "adamw") -> None:
        self.device = device
        torch.manual_seed(0)
        self.model = create_model(ModelConfig(name, num_classes=num_classes))
        channels_last = device.type == "cuda" if channels_last is None else channels_last  # the peer's default
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        try:
            from convforever.peer import accel, recipe

            self.source = "convforever.peer.accel + convforever.peer.recipe"
            prec = accel.resolve_precision(precision, device)
            self.dtype = prec.dtype
            if prec.scaled:  # fp16 on pre-bf16 cards; the peer uses hivemind's GradScaler for the same job
                self.scaler = torch.amp.GradScaler("cuda")
            else:
                self.scaler = None
            self.forward = accel.prepare_model(self.model, device, channels_last=channels_last, compile=compile,
                                               checkpointing=checkpointing)
            setup = recipe.build_optimizer_setup(self.model, recipe.RecipeConfig(), accel.optimizer_class(optimizer))
            self.opt = setup.optimizer(setup.params)
            self._autocast = lambda: accel.autocast(prec, device)
        except ImportError as e:
            self.source = f"copy of the peer's step (convforever.peer did not import: {e})"
            self._mirror(device, precision, channels_last, compile, checkpointing, optimizer)

    def _mirror(self, device, precision, channels_last, compile, checkpointing, optimizer) -> None:
        from convforever.model import param_groups

        use_bf16 = device.type == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
        self.dtype = torch.bfloat16 if use_bf16 else None
        self.scaler = None
        if checkpointing:
            self.model.set_grad_checkpointing(True)
        self.model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if compile else self.model
        if optimizer == "adamw8bit":
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit
        else:
            cls = torch.optim.AdamW
        self.opt = cls(param_groups(self.model, 0.05), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
        self._autocast = lambda: (torch.autocast(device.type, dtype=self.dtype) if self.dtype is not None
                                  else contextlib.nullcontext())

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.model.train()
        images = images.contiguous(memory_format=self.memory_format)
        with self._autocast():
            loss = F.cross_entropy(self.forward(images), labels)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad()
        return loss.item()


class TimmStep:
    """A plain timm training loop: timm's model, the same autocast dtype, torch AdamW, nothing else."""

    def __init__(self, timm, name: str, num_classes: int, device: torch.device, dtype: torch.dtype | None, *,
                 channels_last: bool = False, compile: bool = False) -> None:
        torch.manual_seed(0)
        self.model = timm.create_model(name, num_classes=num_classes).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if compile else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.device, self.dtype = device, dtype

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.model.train()
        images = images.contiguous(memory_format=self.memory_format)
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(self.forward(images), labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return loss.item()


# --- subcommands -------------------------------------------------------------------------------------------------


def cmd_env(args: argparse.Namespace) -> dict:
    out = dict(python=sys.version.split()[0], platform=platform.platform(), torch=torch.__version__,
               cuda=torch.version.cuda, device=args.device, cpu_count=os.cpu_count())
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=props.total_memory / GiB, capability=f"{props.major}.{props.minor}",
                   bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
    for name in ("timm", "bitsandbytes", "hivemind"):
        module, err = try_import(name)
        out[name] = getattr(module, "__version__", "?") if module else f"missing ({err})"
    try:
        from convforever.peer import accel  # noqa: F401

        out["peer_step"] = "convforever.peer.accel"
    except ImportError as e:
        out["peer_step"] = f"copy (convforever.peer.accel: {e})"
    return out


def timed(step, x, y, steps: int, device: torch.device) -> float:
    """Images/s over ``steps`` steps."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(x, y)
    sync(device)
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss {loss}")
    return steps * x.shape[0] / (time.perf_counter() - t0)


def cmd_throughput(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    variants: dict[str, object] = {}
    ours = OurStep(args.model, args.num_classes, device)
    variants["ours"] = ours
    out: dict = dict(model=args.model, batch=args.batch, image_size=args.image_size, num_classes=args.num_classes,
                     our_step=ours.source, autocast=str(ours.dtype), our_channels_last=ours.memory_format ==
                     torch.channels_last, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    timm, err = try_import("timm")
    if timm is None:
        log(f"timm does not import ({err}): measuring our step only")
        out["timm"] = f"missing ({err})"
    else:
        out["timm"] = timm.__version__
        variants["timm plain"] = TimmStep(timm, args.model, args.num_classes, device, ours.dtype)
        variants["timm + channels_last"] = TimmStep(timm, args.model, args.num_classes, device, ours.dtype,
                                                    channels_last=True)
    if args.compile:
        variants["ours --compile"] = OurStep(args.model, args.num_classes, device, compile=True)
    for name, step in variants.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step(x, y)
        sync(device)
        log(f"warmed up {name} ({args.warmup} steps, {time.perf_counter() - t0:.1f} s)")
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):  # interleaved rounds: clock and thermal drift hit every variant alike
        for name, step in variants.items():
            rates[name].append(timed(step, x, y, args.steps, device))
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.0f} img/s" for n, v in rates.items()))
    out["images_per_s"] = {name: sorted(v)[len(v) // 2] for name, v in rates.items()}
    out["images_per_s_rounds"] = rates
    if "timm plain" in rates:
        med = out["images_per_s"]
        out["ratio_vs_timm_plain"] = med["ours"] / med["timm plain"]
        out["ratio_vs_timm_channels_last"] = med["ours"] / med["timm + channels_last"]
        if "ours --compile" in med:
            out["ratio_compiled_vs_timm_plain"] = med["ours --compile"] / med["timm plain"]
    return out


def cmd_memory(args: argparse.Namespace) -> dict:
    """Peak memory of our step at --batch for AdamW / AdamW8bit, with and without checkpointing.

    On CUDA the caching allocator is capped at ``fit-gb`` minus what this process's CUDA context already takes
    (measured), so "fits" means the steps ran without an out-of-memory error on a card of that size.
    """
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    out: dict = dict(model=args.model, batch=args.batch, image_size=args.image_size, fit_gb=args.fit_gb, rows=[])
    if cuda:
        torch.cuda.init()
        torch.zeros(1, device=device)  # create the context (and cuBLAS/cuDNN handles on first use below)
        free, total = torch.cuda.mem_get_info(device)
        context = total - free - torch.cuda.memory_reserved(device)
        cap = args.fit_gb * 1e9 - context  # "8 GB" as sold: 8e9 bytes
        out.update(total_gib=total / GiB, context_gib=context / GiB, cap_gib=cap / GiB,
                   others_note="context measured as used - reserved right after CUDA init (other processes on "
                               "the card would be counted too)")
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    for optimizer in ("adamw", "adamw8bit"):
        for checkpointing in (False, True):
            row: dict = dict(optimizer=optimizer, checkpointing=checkpointing)
            step = None
            try:
                free_memory(device)
                step = OurStep(args.model, args.num_classes, device, optimizer=optimizer, checkpointing=checkpointing)
                losses = [step(x, y) for _ in range(args.steps)]
                sync(device)
                row.update(fits=True if cuda else None, loss=losses[-1])  # the cap exists on CUDA only
                if cuda:
                    row.update(peak_allocated_gib=(torch.cuda.max_memory_allocated(device) - base) / GiB,
                               peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GiB,
                               static_gib=(torch.cuda.memory_allocated(device) - base) / GiB)
                    row["activations_gib"] = row["peak_allocated_gib"] - row["static_gib"]
            except torch.cuda.OutOfMemoryError as e:
                row.update(fits=False, error=f"out of memory: {str(e).splitlines()[0]}")
            except Exception as e:  # noqa: BLE001 - bitsandbytes without a usable CUDA, ...
                row.update(fits=None, error=f"{type(e).__name__}: {e}")
            del step
            free_memory(device)
            log(f"memory: {optimizer}, checkpointing={checkpointing}: " +
                ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                          if k not in ("optimizer", "checkpointing")))
            out["rows"].append(row)
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return out


TIMM_CASES = (("convnext_tiny", None), ("convnext_atto", 64), ("convnextv2_atto", None))


def cmd_timm_load(args: argparse.Namespace) -> dict:
    """Save our checkpoints with model/checkpoint.py and build them in timm from the folder; compare logits."""
    from convforever.model.checkpoint import save_checkpoint

    device = torch.device(args.device)
    timm, err = try_import("timm")
    if timm is None:
        log(f"timm does not import ({err}): skipping the checkpoint check")
        return dict(skipped=f"timm missing ({err})")
    out: dict = dict(timm=timm.__version__, rows=[])
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-ckpt-"))
    for i, (name, depth) in enumerate(TIMM_CASES):
        torch.manual_seed(i)
        ours = create_model(ModelConfig(name, depth=depth, num_classes=args.num_classes)).eval()
        meta = {"model": ours.config.to_dict(), "image_size": args.image_size,
                "class_names": [f"class {c}" for c in range(args.num_classes)]}
        step_dir = save_checkpoint(tmp / name, 1, ours.state_dict(), meta)
        row: dict = dict(name=name, depth=depth, path=str(step_dir))
        try:
            try:
                theirs = timm.create_model(f"local-dir:{step_dir}", pretrained=True)
                row["how"] = "timm.create_model('local-dir:STEP_DIR', pretrained=True)"
            except Exception as e:  # noqa: BLE001 - timm before local-dir: support
                row["local_dir_error"] = f"{type(e).__name__}: {e}"
                theirs = timm.create_model(name, pretrained=True, num_classes=args.num_classes,
                                           depths=ours.config.depths,
                                           pretrained_cfg_overlay=dict(file=str(step_dir / "model.safetensors")))
                row["how"] = "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))"
            theirs = theirs.eval().to(device)
            ours = ours.to(device)
            x = torch.randn(4, 3, args.image_size, args.image_size, device=device)
            with torch.no_grad():
                diff = (ours(x) - theirs(x)).abs().max().item()
            row.update(max_abs_logit_diff=diff, ok=diff < 1e-3, timm_num_classes=theirs.num_classes)
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        log(f"timm-load {name} depth={depth}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "path"))
        out["rows"].append(row)
    return out


# --- report ---------------------------------------------------------------------------------------------------


def _load(directory: Path, name: str) -> dict | None:
    path = directory / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def report(directory: Path) -> tuple[str, str, dict]:
    """(plain-text summary, markdown section, combined JSON) from whatever parts are in ``directory``."""
    env = _load(directory, "env.json") or {}
    tp = _load(directory, "throughput.json")
    mem = _load(directory, "memory.json")
    tl = _load(directory, "timm.json")
    depth = _load(directory, "depth.json")
    status = _load(directory, "status.json") or {}
    gpu = env.get("gpu") or status.get("nvidia_smi") or env.get("device", "?")
    versions = ", ".join(f"{k} {env.get(k, '?')}" for k in ("torch", "cuda", "timm", "bitsandbytes", "hivemind"))
    summary = [f"GPU check on {gpu} ({versions})"]
    md = [f"- machine: {gpu}; {versions}", f"- command: `{status.get('command', 'bash bench/gpu_check.sh')}`; parts: "
          + ", ".join(f"{k} {v}" for k, v in status.get("parts", {}).items())]

    md.append("\n**(a) training-step throughput** (same card, same batch, interleaved rounds, median)")
    if tp and "images_per_s" in tp:
        md.append(f"\n{tp['model']}, batch {tp['batch']}, {tp['image_size']} px, autocast {tp['autocast']}; ours: "
                  f"{tp['our_step']}, channels_last={tp['our_channels_last']}; {tp['rounds']} rounds x {tp['steps']} "
                  f"steps after {tp['warmup']} warm-up steps\n")
        md += ["| loop | images/s | vs timm plain |", "|---|---:|---:|"]
        plain = tp["images_per_s"].get("timm plain")
        for name, v in tp["images_per_s"].items():
            md.append(f"| {name} | {v:.0f} | {f'{v / plain:.2f}x' if plain else '–'} |")
        if "ratio_vs_timm_plain" in tp:
            goal = "meets" if tp["ratio_vs_timm_plain"] >= 1.1 else "misses"
            summary.append(f"(a) ours {tp['images_per_s']['ours']:.0f} img/s vs timm plain {plain:.0f} img/s: "
                           f"{tp['ratio_vs_timm_plain']:.2f}x ({goal} the 1.1x goal); vs timm + channels_last "
                           f"{tp['ratio_vs_timm_channels_last']:.2f}x")
        else:
            summary.append(f"(a) ours {tp['images_per_s']['ours']:.0f} img/s; timm: {tp.get('timm')}")
    else:
        md.append("\nnot measured" + (f": {tp.get('error')}" if tp else ""))
        summary.append("(a) throughput: not measured")

    md.append("\n**(b) peak memory of our step**" + (f", {mem.get('model')} batch {mem.get('batch')}, "
                                                     f"{mem.get('image_size')} px" if mem else ""))
    if mem and mem.get("rows"):
        if "cap_gib" in mem:
            md.append(f"\nallocator capped at {mem['fit_gb']} GB minus this process's CUDA context "
                      f"({mem['context_gib']:.2f} GiB) = {mem['cap_gib']:.2f} GiB; fits = the steps ran under "
                      "the cap")
        md += ["", "| optimizer | checkpointing | fits | peak allocated GiB | peak reserved GiB "
               "| params+grads+state GiB | activations GiB |", "|---|---|---|---:|---:|---:|---:|"]
        for r in mem["rows"]:
            def g(k, r=r):
                return f"{r[k]:.2f}" if isinstance(r.get(k), (int, float)) else "–"
            fits = {True: "yes", False: "**no**", None: f"? ({r.get('error', '')})"}[r.get("fits")]
            md.append(f"| {r['optimizer']} | {r['checkpointing']} | {fits} | {g('peak_allocated_gib')} "
                      f"| {g('peak_reserved_gib')} | {g('static_gib')} | {g('activations_gib')} |")
        plain = next((r for r in mem["rows"] if r["optimizer"] == "adamw" and not r["checkpointing"]), None)
        verdict = {True: "yes", False: "NO", None: "n/a"}
        fit_rows = [f"{r['optimizer']}{'+ckpt' if r['checkpointing'] else ''}:{verdict[r.get('fits')]}"
                    for r in mem["rows"]]
        summary.append(f"(b) {mem['model']} bs {mem['batch']} fits {mem['fit_gb']} GB: " + ", ".join(fit_rows) +
                       (f"; plain AdamW peak {plain['peak_allocated_gib']:.2f} GiB" if plain and
                        "peak_allocated_gib" in plain else ""))
    else:
        md.append("\nnot measured")
        summary.append("(b) memory: not measured")

    md.append("\n**(c) our checkpoints in timm**")
    if tl and tl.get("rows"):
        md += ["\n| checkpoint | how | max abs logit diff | ok |", "|---|---|---:|---|"]
        for r in tl["rows"]:
            diff = f"{r['max_abs_logit_diff']:.2e}" if "max_abs_logit_diff" in r else r.get("error", "–")
            arch = "preset" if r["depth"] is None else f"depth={r['depth']}"
            md.append(f"| {r['name']} {arch} | `{r.get('how', '–')}` | {diff} | {r['ok']} |")
        summary.append("(c) timm loads our checkpoints: " + ", ".join(
            f"{r['name']}{'' if r['depth'] is None else '@' + str(r['depth'])}={'ok' if r['ok'] else 'FAIL'}"
            for r in tl["rows"]))
    else:
        md.append("\nnot measured" + (f": {tl.get('skipped')}" if tl else ""))
        summary.append("(c) timm load: " + (tl.get("skipped", "not measured") if tl else "not measured"))

    md.append("\n**(d) activation memory vs depth on this card** "
              f"(`bench/depth_memory.py --device {(depth or {}).get('device', 'cuda')}`)")
    if depth and depth.get("rows"):
        md.append(f"\n{depth['model']} dims, batch {depth['batch']}, {depth['image_size']} px\n")
        md.append(markdown(depth))
        q = ratios(depth)
        summary.append("(d) peak activations depth " + " / ".join(
            f"{m}: {v['peak_mb']:.1f}x" for m, v in q.items() if "peak_mb" in v) +
            (f" ({next(iter(q.values()))['hi']} vs {next(iter(q.values()))['lo']})" if q else ""))
    else:
        md.append("\nnot measured")
        summary.append("(d) depth memory: not measured")
    section = (f"\n## {datetime.date.today()} — GPU check, {gpu}\n\n" + "\n".join(md) + "\n")
    combined = dict(env=env, throughput=tp, memory=mem, timm=tl, depth=depth, status=status)
    return "\n".join(summary), section, combined


def cmd_report(args: argparse.Namespace) -> None:
    summary, section, combined = report(args.dir)
    (args.dir / "gpu_check.md").write_text(section)
    (args.dir / "gpu_check.json").write_text(json.dumps(combined, indent=2))
    print("=" * 100)
    print(summary)
    print("=" * 100)
    if args.append:
        append_results(section)
        print(f"appended to {RESULTS}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("env", "throughput", "memory", "timm-load", "report"))
    p.add_argument("--out", type=Path, help="JSON file this part writes")
    p.add_argument("--dir", type=Path, help="report: the folder holding the parts")
    p.add_argument("--append", action="store_true", help="report: append the section to bench/RESULTS.md")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--num-classes", type=int, default=ModelConfig().num_classes)
    p.add_argument("--batch", type=int, default=None, help="default: 128 for throughput, 64 for memory")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (throughput) / steps (memory)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="throughput: also our step with --compile")
    p.add_argument("--fit-gb", type=float, default=8.0)
    args = p.parse_args()
    if args.command == "report":
        cmd_report(args)
        return
    if args.batch is None:
        args.batch = 128 if args.command == "throughput" else 64
    if args.steps is None:
        args.steps = 20 if args.command == "throughput" else 3
    t0 = time.perf_counter()
    fn = {"env": cmd_env, "throughput": cmd_throughput, "memory": cmd_memory, "timm-load": cmd_timm_load}[args.command]
    try:
        result = fn(args)
    except Exception as e:  # noqa: BLE001 - the report says what failed; the other parts still run
        traceback.print_exc()
        result = dict(error=f"{type(e).__name__}: {e}")
    result["seconds"] = time.perf_counter() - t0
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    log(f"{args.command} done in {result['seconds']:.0f} s" + (f": {result['error']}" if "error" in result else ""))
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
