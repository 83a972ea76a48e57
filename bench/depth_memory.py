"""Peak activation memory of one training step (forward + backward) as ``depth`` grows, with and without
gradient checkpointing; the depth study of issue 7 ("depth without a memory wall").

Each configuration runs in a fresh subprocess, so one configuration's allocations cannot hide another's peak.
In the subprocess: build the model, allocate every ``.grad`` up front (parameters + gradients are then part of
the baseline, and the backward accumulates into them in place), run one warm-up step, zero the gradients in
place, free what can be freed, then measure one step:

  * CPU: the step's peak resident set size minus the resident set just before it. The kernel's high-water mark
    (VmHWM in /proc/self/status) is reset to the current RSS right before the step by writing ``5`` to
    /proc/self/clear_refs, ``malloc_trim(0)`` first hands memory glibc still caches from the warm-up back to
    the kernel, and tensors of 64 KiB or more get their own mmap (``mallopt``), so they leave the RSS when
    freed. Where clear_refs is not allowed, ``ru_maxrss`` (a peak that can never be reset) is used, which is
    only right if the step is the process's peak; the table says which. tracemalloc would be the obvious
    Python tool, but it only sees allocations made through Python's allocator, and torch allocates tensor
    memory in C++ (c10's CPU allocator, posix_memalign), which it never sees; the RSS of a fresh process sees
    everything, including memory that is not activations: freed small chunks glibc keeps resident and
    oneDNN's own buffers, which grow with the number of blocks (see RESULTS.md).
  * CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
    ``memory_allocated()`` before the step: exact bytes of tensors, without the caching allocator's slack.
  * "live tensors" (CPU by default, ``--tensor-peak``): the exact peak of tensor bytes the step's aten ops
    hold (``LiveTensorBytes``, a dispatch mode), parameters and gradients excluded; deterministic.
  * "saved": with ``torch.autograd.graph.saved_tensors_hooks``, the distinct storages (not parameters)
    autograd holds for backward at the end of the forward; deterministic, and what checkpointing is there to
    shrink. It misses the recompute working set of the backward, which the peaks include.

``--stability`` runs the other half of the study instead: a deep stack trained for a few steps with layer
scale 1e-6 and 1.0 (``stability_run``).

Checkpointing schemes (``ConvNeXt.set_grad_checkpointing(enable, scheme)``): ``block`` checkpoints every
block, keeping one block input per block, so its memory still grows linearly with depth (N inputs + one
block's activations while it is recomputed); ``nested`` (what ``auto``, the default, uses for stages of 32
blocks or more) checkpoints segments of about sqrt(N) blocks and, inside a segment being recomputed, every
block again: about 2*sqrt(N) inputs + one block's activations, for one extra forward of the stage.

    .venv/bin/python bench/depth_memory.py               # CPU: atto dims, batch 8, 64 px, depth 16/256/1024 (~12 min)
    .venv/bin/python bench/depth_memory.py --device cuda # the same on a GPU (bench/gpu_check.sh runs it)
    .venv/bin/python bench/depth_memory.py --stability   # depth 256, 30 steps, layer scale 1e-6 vs 1.0 (~5 min)
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
import types
from pathlib import Path
from results import append_results  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
MODES = ("off", "block", "nested", "auto")


def ensure_convforever() -> None:
    """Make ``convforever.model`` and ``convforever.peer`` importable from this checkout when not installed.

    ``pyproject.toml`` maps the folders ``model/`` and ``peer/`` to ``convforever.model`` / ``convforever.peer``;
    on a machine where ``pip install -e .`` cannot run (no network, missing dependencies such as hivemind), the
    same namespace is built from the source folders. Of ``convforever.peer`` only modules that need no swarm
    code import that way (``accel``, ``recipe``: torch only); ``convforever.model`` needs torch and, for
    checkpoints, safetensors.
    """
    for sub, folder in (("model", "model"), ("peer", "peer")):
        name = f"convforever.{sub}"
        try:
            importlib.import_module(name)
            continue
        except ImportError:
            pass
        pkg = sys.modules.get("convforever")
        if pkg is None or not hasattr(pkg, "__path__"):
            pkg = types.ModuleType("convforever")
            pkg.__path__ = []
            sys.modules["convforever"] = pkg
        spec = importlib.util.spec_from_file_location(name, ROOT / folder / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(pkg, sub, module)


# --- measuring one configuration (runs in its own process) -------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _mallopt(param: int, value: int) -> bool:
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(param, value))


class SavedBytes:
    """Distinct storages autograd saves for backward, parameters excluded (they are memory anyway)."""

    def __init__(self, params) -> None:
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.param_ptrs:
            self.storages[ptr] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class LiveTensorBytes:
    """Exact peak of live tensor bytes during a region, from the tensors aten ops return (a dispatch mode).

    Every op's outputs are recorded by storage with a weak reference to the C++ storage, and after every op
    the dead ones are dropped and the live total compared with the peak (garbage collection paused). Storages
    alive before (``exclude``: parameters and their preallocated gradients) are not counted. Deterministic and
    device-independent; it does not see workspaces a kernel allocates and frees inside itself, nor allocator
    slack (glibc keeps freed small chunks resident, which the RSS includes). One Python sweep
    over the live storages per op: seconds for thousands of blocks with checkpointing, a minute or two for
    1024 blocks without.
    """

    def __init__(self, exclude) -> None:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, tuple] = {}
        self.peak = 0
        self.ops = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        storage = t.untyped_storage()
                        ptr = storage.data_ptr()
                        known = tracker.live.get(ptr)
                        # A freed storage's address can be reused within one op: a dead entry is replaced.
                        if ptr and ptr not in tracker.exclude and (known is None or known[0].expired()):
                            tracker.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
                tracker.sweep()
                return out

        self.mode = Mode()

    def sweep(self) -> None:
        self.ops += 1
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))

    def __enter__(self) -> LiveTensorBytes:
        # The cyclic garbage collector would free tensors held in reference cycles at moments that depend on
        # Python's allocation history: off inside the region, so the peak is the same on every run.
        gc.collect()
        self.gc_was_enabled = gc.isenabled()
        gc.disable()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        if self.gc_was_enabled:
            gc.enable()


def saved_bytes(model, x, y) -> int:
    """Bytes of tensors autograd holds at the end of the forward (then runs the backward to free them)."""
    import torch
    import torch.nn.functional as F

    counter = SavedBytes(model.parameters())
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return counter.total


def measure(cfg: dict) -> dict:
    """One configuration: parameters, peak activation bytes of one step, saved bytes, step time."""
    import torch
    import torch.nn.functional as F

    ensure_convforever()
    from convforever.model import ModelConfig, create_model

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with device:  # built (and initialised) on the device: seconds instead of a minute for 1024 blocks on CUDA
        model = create_model(ModelConfig(cfg["model"], depth=cfg["depth"], num_classes=50,
                                         drop_path_rate=cfg["drop_path_rate"]))
    model.to(device).train()
    if cfg["mode"] != "off":
        model.set_grad_checkpointing(True, scheme=cfg["mode"])
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.zeros_like(p)
    x = torch.randn(cfg["batch"], 3, cfg["image_size"], cfg["image_size"], device=device)
    y = torch.randint(0, 50, (cfg["batch"],), device=device)

    def step() -> None:
        F.cross_entropy(model(x), y).backward()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: lazy initialisation of kernels, thread pools, cuDNN / oneDNN
    sync()
    saved = saved_bytes(model, x, y)
    for p in params:
        p.grad.zero_()
    gc.collect()
    sync()
    out = dict(cfg, params=n_params, param_mb=n_params * 4 / 2**20, saved_mb=saved / 2**20)
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync()
        out.update(peak_mb=(torch.cuda.max_memory_allocated(device) - base) / 2**20, base_mb=base / 2**20,
                   method="cuda max_memory_allocated")
    else:
        # Tensors of 64 KiB and more get their own mmap and go back to the kernel when freed, so the RSS
        # follows live tensor memory rather than glibc's heap fragmentation (with glibc's default dynamic
        # threshold, freed activations stay resident as holes between the block inputs checkpointing keeps).
        out["fixed_mmap_threshold"] = _mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        _malloc_trim()
        base_kb = _status_kb("VmRSS")
        if base_kb is not None and _reset_peak_rss():
            step()
            out.update(peak_mb=(_status_kb("VmHWM") - base_kb) / 1024, base_mb=base_kb / 1024,
                       method="VmHWM after clear_refs")
        else:  # ru_maxrss cannot be reset: only right when the measured step is the process's peak
            before = _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            step()
            out.update(peak_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                       base_mb=before / 1024, method="ru_maxrss")
    if not cuda:  # time without the page faults of fresh mmaps: keep freed memory in the heap for reuse
        _mallopt(M_MMAP_THRESHOLD, 1 << 30)
        _mallopt(M_TRIM_THRESHOLD, 1 << 30)
        step()
    times = []
    for _ in range(cfg["repeats"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    out["step_s"] = sorted(times)[len(times) // 2]
    out["tensor_peak_mb"] = None
    if cfg.get("tensor_peak"):
        for p in params:
            p.grad.zero_()
        with LiveTensorBytes(params + [p.grad for p in params]) as live:
            step()
        out["tensor_peak_mb"] = live.peak / 2**20
    return out


def run_isolated(cfg: dict, timeout: float) -> dict:
    """``measure(cfg)`` in a fresh Python process (nothing allocated before it can hide its peak)."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the study -----------------------------------------------------------------------------------------------


def study(args: argparse.Namespace, log=print) -> dict:
    """Every (depth, mode) in its own process; rows in that order."""
    depths: list[int | None] = ([None] if args.preset else []) + list(args.depths)
    rows = []
    for depth in depths:
        for mode in args.modes:
            cfg = dict(model=args.model, depth=depth, batch=args.batch, image_size=args.image_size,
                       device=args.device, mode=mode, drop_path_rate=args.drop_path_rate, threads=args.threads,
                       repeats=args.repeats, tensor_peak=args.tensor_peak)
            t0 = time.perf_counter()
            r = run_isolated(cfg, args.timeout)
            tensors = "" if r["tensor_peak_mb"] is None else f", live tensors {r['tensor_peak_mb']:.1f} MB"
            log(f"  depth={depth or 'preset'} checkpointing={mode}: {r['params'] / 1e6:.1f}M params, "
                f"peak activations {r['peak_mb']:.1f} MB{tensors}, saved {r['saved_mb']:.1f} MB, "
                f"step {r['step_s']:.3f} s ({time.perf_counter() - t0:.0f} s)", flush=True)
            rows.append(r)
            if args.json:  # partial results survive a timeout of the whole study
                args.json.write_text(json.dumps(dict(model=args.model, batch=args.batch, image_size=args.image_size,
                                                     device=args.device, modes=list(args.modes), rows=rows,
                                                     partial=True), indent=2))
    return dict(model=args.model, batch=args.batch, image_size=args.image_size, device=args.device,
                modes=list(args.modes), rows=rows)


METRICS = (("peak_mb", "peak"), ("tensor_peak_mb", "live tensors"), ("saved_mb", "saved"))


def ratios(result: dict) -> dict[str, dict]:
    """Per mode: each memory measure at the largest override depth over the smallest."""
    out = {}
    for mode in result["modes"]:
        rows = [r for r in result["rows"] if r["mode"] == mode and r["depth"] is not None]
        if len(rows) < 2:
            continue
        lo, hi = rows[0], rows[-1]
        q = dict(lo=lo["depth"], hi=hi["depth"])
        for key, _ in METRICS:
            if lo.get(key) is not None and hi.get(key) is not None:
                q[key] = hi[key] / max(lo[key], 1e-9)
        out[mode] = q
    return out


def markdown(result: dict) -> str:
    ensure_convforever()
    from convforever.model import ModelConfig

    cuda = result["device"].startswith("cuda")
    lines = [f"| depth | stage depths | params | params+grads MB | checkpointing | peak act. MB "
             f"({'max_memory_allocated' if cuda else 'RSS'}) | peak live tensors MB | saved for backward MB "
             "| off / this (peak) | step s | step vs off |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    off = {r["depth"]: r for r in result["rows"] if r["mode"] == "off"}

    def fmt(v, spec=".1f"):
        return "–" if v is None else format(v, spec)

    for r in result["rows"]:
        depths = ModelConfig(result["model"], depth=r["depth"]).depths
        base = off.get(r["depth"])
        vs = f"{base['peak_mb'] / max(r['peak_mb'], 1e-9):.1f}x" if base else "–"
        slower = f"{r['step_s'] / base['step_s']:.2f}x" if base else "–"
        lines.append(f"| {r['depth'] or 'preset'} | {'/'.join(map(str, depths))} | {r['params'] / 1e6:.1f}M "
                     f"| {2 * r['param_mb']:.0f} | {r['mode']} | {fmt(r['peak_mb'])} | {fmt(r['tensor_peak_mb'])} "
                     f"| {fmt(r['saved_mb'])} | {vs} | {r['step_s']:.3f} | {slower} |")
    rs = ratios(result)
    if rs:
        lines.append("")
        for mode, q in rs.items():
            parts = ", ".join(f"{label} {q[key]:.1f}x" for key, label in METRICS if key in q)
            lines.append(f"- activation memory at depth {q['hi']} / at depth {q['lo']}, "
                         f"checkpointing `{mode}`: {parts}")
    return "\n".join(lines)


# --- stability of deep stacks --------------------------------------------------------------------------------


def stability_run(depth: int, ls: float, drop_path_rate: float, lr: float, *, steps: int, batch: int,
                  image_size: int, clip: float | None, warmup: int, seed: int = 0) -> dict:
    """Train ``depth`` blocks of atto dims for ``steps`` steps on a fixed, learnable synthetic task.

    The task: 10 classes, each a fixed random image ("template"); a sample is its class's template plus unit
    Gaussian noise; 512 samples drawn once, batches drawn from them with a seeded generator, so every run
    sees the same batches. The optimizer is the swarm recipe's (peer/recipe.py): AdamW (0.9, 0.999), weight
    decay 0.05 off biases/norms/layer scale, linear warm-up, global-norm clipping at ``clip`` (None: off).
    """
    import math

    import torch
    import torch.nn.functional as F

    ensure_convforever()
    from convforever.model import ModelConfig, create_model, param_groups

    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 3, image_size, image_size, generator=g)
    labels = torch.randint(0, 10, (512,), generator=g)
    images = templates[labels] + torch.randn(512, 3, image_size, image_size, generator=g)
    torch.manual_seed(seed)
    model = create_model(ModelConfig("atto", depth=depth, num_classes=10, drop_path_rate=drop_path_rate,
                                     layer_scale_init_value=ls)).train()
    with torch.no_grad():
        model.eval()
        logit_std_init = model(images[:64]).std().item()
        model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=lr, betas=(0.9, 0.999))
    losses, norms = [], []
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1))
        idx = torch.randint(0, 512, (batch,), generator=g)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
        losses.append(loss.item())
        norms.append(norm.item())
        if math.isfinite(norm.item()):
            opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        model.eval()
        logits = model(images[:64])
        eval_loss = F.cross_entropy(logits, labels[:64]).item()
    finite = [x for x in losses if math.isfinite(x)]
    return dict(depth=depth, ls=ls, drop_path_rate=drop_path_rate, lr=lr, clip=clip, steps=steps,
                nonfinite=len(losses) - len(finite), first5=sum(losses[:5]) / len(losses[:5]),
                last5=sum(losses[-5:]) / len(losses[-5:]),
                min_loss=min(finite) if finite else math.nan, max_grad_norm=max(norms),
                median_grad_norm=sorted(norms)[len(norms) // 2], logit_std_init=logit_std_init,
                logit_std_end=logits.std().item(), eval_loss=eval_loss, seconds=seconds, losses=losses)


def stability(args: argparse.Namespace, log=print) -> dict:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    rows = []
    for lr in args.lrs:
        for ls in args.layer_scales:
            r = stability_run(args.stability_depth, ls, args.stability_drop_path, lr, steps=args.steps,
                              batch=args.batch, image_size=args.image_size, clip=args.clip or None, warmup=args.warmup)
            log(f"  ls={ls:g} lr={lr:g}: loss {r['first5']:.3f} -> {r['last5']:.3f} (min {r['min_loss']:.3f}), "
                f"{r['nonfinite']} non-finite, grad norm median {r['median_grad_norm']:.2f} max "
                f"{r['max_grad_norm']:.2f}, eval loss {r['eval_loss']:.3f} ({r['seconds']:.0f} s)", flush=True)
            rows.append(r)
    return dict(rows=rows)


def stability_markdown(result: dict) -> str:
    lines = ["| layer scale init | drop path (linear to) | lr | clip | loss, mean of steps 1-5 | loss, mean of last 5 "
             "| min loss | non-finite steps | grad norm median / max (before clipping) | logit std at init / end "
             "| loss on 64 pool samples after training (eval mode) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['ls']:g} | {r['drop_path_rate']:g} | {r['lr']:g} | {r['clip'] or 'off'} "
                     f"| {r['first5']:.3f} | {r['last5']:.3f} "
                     f"| {r['min_loss']:.3f} | {r['nonfinite']} | {r['median_grad_norm']:.2f} / "
                     f"{r['max_grad_norm']:.2f} | {r['logit_std_init']:.3f} / {r['logit_std_end']:.3f} "
                     f"| {r['eval_loss']:.3f} |")
    return "\n".join(lines)


def machine_facts(device: str, threads: int | None) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or "unknown"
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).strip()
    except (OSError, AttributeError):
        pass
    return (f"{os.cpu_count()}-core CPU ({platform.machine()}, {cpu}), "
            f"torch {torch.__version__}, {threads or torch.get_num_threads()} torch thread(s) per worker")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="convnext_atto", help="preset whose dims are used (default convnext_atto)")
    p.add_argument("--depths", type=int, nargs="+", default=[16, 256, 1024])
    p.add_argument("--no-preset", dest="preset", action="store_false", help="skip the preset's own depths row")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["off", "block", "nested"],
                   help="checkpointing schemes to compare (off = none)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--drop-path-rate", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the workers (default: 1 on the CPU, where a shared box makes OpenMP "
                        "timings swing; the device's default on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (median reported)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--tensor-peak", choices=("auto", "yes", "no"), default="auto",
                   help="also measure the exact live-tensor peak (a slow Python pass per op); auto: CPU only")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--note", default="", help="a line for the RESULTS.md section")
    p.add_argument("--from-json", type=Path, help="print (and append) a result written by --json; measure nothing")
    p.add_argument("--stability", action="store_true",
                   help="instead: train a deep stack briefly with each --layer-scales and --lrs (32 px by default)")
    p.add_argument("--stability-depth", type=int, default=256)
    p.add_argument("--stability-drop-path", type=float, default=0.1,
                   help="stochastic depth of the last block; 0 at the first, linear in between")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--layer-scales", type=float, nargs="+", default=[1e-6, 1.0])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 4e-3], help="peak learning rates (after warm-up)")
    p.add_argument("--warmup", type=int, default=10, help="steps of linear warm-up (the recipe's default)")
    p.add_argument("--clip", type=float, default=5.0, help="global grad-norm clip (the recipe's default); 0: off")
    args = p.parse_args()
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    args.tensor_peak = args.tensor_peak == "yes" or (args.tensor_peak == "auto" and args.device == "cpu")
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    if args.stability:
        run_stability(args)
        return
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        result["note"] = args.note or result.get("note", "")
    else:
        t0 = time.perf_counter()
        print(f"depth memory study: {args.model} dims, batch {args.batch}, {args.image_size} px, {args.device}, "
              f"modes {args.modes}", flush=True)
        result = study(args)
        result.update(seconds=time.perf_counter() - t0, machine=machine_facts(args.device, args.threads),
                      date=str(datetime.date.today()), drop_path_rate=args.drop_path_rate, note=args.note,
                      command=" ".join(["python", "bench/depth_memory.py", *sys.argv[1:]]))
    table = markdown(result)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not args.no_append:
        append_section(result, table)


def run_stability(args: argparse.Namespace) -> None:
    if "--image-size" not in sys.argv:
        args.image_size = 32
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        print(f"stability: depth {args.stability_depth}, atto dims, batch {args.batch}, {args.image_size} px, "
              f"{args.steps} steps", flush=True)
        t0 = time.perf_counter()
        result = stability(args)
        result.update(seconds=time.perf_counter() - t0, machine=machine_facts("cpu", args.threads),
                      date=str(datetime.date.today()), depth=args.stability_depth, batch=args.batch,
                      image_size=args.image_size, steps=args.steps, warmup=args.warmup, clip=args.clip,
                      command=" ".join(["python", "bench/depth_memory.py", *sys.argv[1:]]))
    table = stability_markdown(result)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.no_append:
        return
    section = (f"\n## {result['date']} — training stability of a deep stack, CPU\n\n"
               f"- command: `{result['command']}`\n- machine: {result['machine']}\n"
               f"- depth {result['depth']} (atto dims, {result['depth'] // 4} blocks a stage), "
               f"batch {result['batch']}, "
               f"{result['image_size']} px, {result['steps']} steps; synthetic task: 10 classes, sample = fixed random "
               "template of its class + unit Gaussian noise, 512 samples, the same batches in every run; AdamW "
               f"(0.9, 0.999), weight decay 0.05 (not on biases, norms, layer scale), {result['warmup']} steps of "
               "linear warm-up, global grad-norm clipping as in the clip column (the recipe clips at 5); "
               "chance loss ln 10 = 2.303; "
               f"run took {result['seconds']:.0f} s\n" + (f"- {args.note}\n" if args.note else "")
               + "\n" + table + "\n")
    append_results(section)


def append_section(result: dict, table: str) -> None:
    r0 = result["rows"][0]
    section = (f"\n## {result['date']} — activation memory vs depth, {result['device']}\n\n"
               f"- command: `{result['command']}`\n- machine: {result['machine']}\n"
               f"- {result['model']} dims, batch {result['batch']}, {result['image_size']} px, drop path "
               f"{result['drop_path_rate']}; one forward+backward (no optimizer step), each configuration in a fresh "
               f"process; peak activations: {r0['method']} minus the resident memory (parameters + preallocated "
               "gradients) just before the step; live tensors: exact peak of tensor bytes the step's aten ops "
               "hold (no allocator slack, no kernel-internal workspaces); saved: distinct tensors autograd keeps "
               f"at the end of the forward; step s: median of {r0['repeats']} steps; "
               f"run took {result['seconds']:.0f} s\n"
               + (f"- {result['note']}\n" if result.get("note") else "") + "\n" + table + "\n")
    append_results(section)


if __name__ == "__main__":
    main()
