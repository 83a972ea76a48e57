"""Publishing checkpoints to the Hugging Face Hub: one model repository per run, one commit per checkpoint.

Each commit ("step N, loss X") holds the step folder's ``model.safetensors`` and ``config.json`` (timm's
Hub format, see `convforever.model.checkpoint`), a model card (``README.md``) and the loss curve
(``loss.png``), and is tagged ``step-N``, so ``ORG/REPO@step-N`` names one checkpoint for ever.

Uploads run in a background thread: the coordinator's loop hands over a checkpoint and goes back to
its duties. A failed upload is retried with exponential backoff; only the newest pending checkpoint is
kept (an older one would be superseded anyway). Errors are explained once per kind, with what to do,
instead of a traceback per retry.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from PIL import Image, ImageDraw

from convforever.model.checkpoint import CONFIG_NAME, EMA_WEIGHTS_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)


@dataclass
class HubConfig:
    repo_id: str  # ORG/NAME
    private: bool = False
    token: Optional[str] = None  # None: HF_TOKEN or the huggingface_hub login
    max_backoff: float = 300.0

    def __post_init__(self) -> None:
        parts = self.repo_id.split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--hub-repo {self.repo_id!r}: use ORG/NAME (or pass --org and let the run id name it)")


@dataclass
class Upload:
    """One checkpoint to publish: its step folder and the card's content."""

    step: int
    step_dir: Path
    loss: float
    card: str
    curve_png: bytes


def default_repo(org: str, run_id: str) -> str:
    return f"{org}/ConvForever-{run_id}"


def explain(error: BaseException) -> tuple[str, bool]:
    """(a message saying what to do, whether retrying can help)."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(error, "response", None), "status_code", None) if isinstance(error, HfHubHTTPError) else None
    if status == 401:
        return "the Hub refused our token (401): set HF_TOKEN or run `hf auth login` on the coordinator", False
    if status == 403:
        return "the token may not write to this repository (403): use a token with write access to its org", False
    if status == 404:
        return "the Hub answered 404: check --hub-repo / --org (the org must exist and be yours)", False
    if status is not None and status >= 500:
        return f"the Hub had a server error ({status}); retrying with backoff", True
    if status is not None:
        return f"the Hub refused the upload ({status}: {error}); retrying", True
    return f"could not reach the Hub ({type(error).__name__}: {error}); retrying with backoff", True


class HubPublisher:
    """A background uploader. `submit` never blocks; `close` waits briefly for the last upload."""

    def __init__(self, config: HubConfig, api=None, sleep: Callable[[float], None] = time.sleep) -> None:
        from huggingface_hub import HfApi

        self.config = config
        self.api = api or HfApi(token=config.token)
        self._sleep = sleep
        self._pending: Optional[Upload] = None
        self._wake = threading.Condition()
        self._closing = False
        self._repo_ready = False
        self._explained: set[str] = set()
        self.published: list[int] = []  # steps uploaded and tagged, oldest first
        self.last_error: Optional[str] = None
        self._thread = threading.Thread(target=self._run, name="hub-upload", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{self.api.endpoint}/{self.config.repo_id}"

    def submit(self, upload: Upload) -> None:
        with self._wake:
            if self._pending is not None:
                logger.info(f"Hub: step {self._pending.step} was not uploaded yet; step {upload.step} replaces it")
            self._pending = upload
            self._wake.notify()

    def _run(self) -> None:
        delay = 0.0
        while True:
            with self._wake:
                while self._pending is None and not self._closing:
                    self._wake.wait()
                if self._pending is None:
                    return
                upload = self._pending
            try:
                self._publish(upload)
            except Exception as error:  # every failure is explained and retried, never raised into the loop
                message, retryable = explain(error)
                self.last_error = message
                if message not in self._explained:
                    self._explained.add(message)
                    logger.warning(f"Hub upload of step {upload.step} to {self.config.repo_id} failed: {message}")
                else:
                    logger.debug(f"Hub upload failed again: {error!r}")
                delay = min(self.config.max_backoff, delay * 2 or 2.0) if retryable else self.config.max_backoff
                with self._wake:
                    if self._closing:
                        return
                    self._wake.wait(timeout=delay)
                continue
            delay = 0.0
            self.last_error = None
            with self._wake:
                if self._pending is upload:
                    self._pending = None

    def _publish(self, upload: Upload) -> None:
        from huggingface_hub import CommitOperationAdd

        if not self._repo_ready:
            self.api.create_repo(self.config.repo_id, repo_type="model", private=self.config.private, exist_ok=True)
            self._repo_ready = True
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(upload.step_dir / name))
                      for name in (WEIGHTS_NAME, EMA_WEIGHTS_NAME, CONFIG_NAME)
                      if (upload.step_dir / name).is_file()]
        operations += [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=upload.card.encode()),
                       CommitOperationAdd(path_in_repo="loss.png", path_or_fileobj=upload.curve_png)]
        loss = f"{upload.loss:.4f}" if math.isfinite(upload.loss) else "n/a"
        commit = self.api.create_commit(self.config.repo_id, operations=operations, repo_type="model",
                                        commit_message=f"step {upload.step}, loss {loss}")
        tag = f"step-{upload.step}"
        try:
            self.api.create_tag(self.config.repo_id, tag=tag, revision=commit.oid, repo_type="model")
        except Exception as error:  # the tag exists (a retry after a lost answer): the commit is what matters
            if getattr(getattr(error, "response", None), "status_code", None) != 409:
                raise
        self.published.append(upload.step)
        if len(self._explained):
            logger.info("Hub uploads work again")
            self._explained.clear()
        logger.info(f"published step {upload.step} to {self.url} (tag {tag})")

    def close(self, timeout: float = 30.0) -> None:
        """Give the last checkpoint a chance to go up, then stop (it stays on disk either way)."""
        deadline = time.monotonic() + timeout
        while self._pending is not None and self.last_error is None and time.monotonic() < deadline:
            self._sleep(0.2)
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=5)
        if self._pending is not None:
            logger.warning(f"Hub: step {self._pending.step} was not uploaded; it is in {self._pending.step_dir}")


# -------------------------------------------------------------------------------------------- the card


def loss_curve_png(points: list[tuple[int, float]], size: tuple[int, int] = (640, 320)) -> bytes:
    """The loss against the global step, drawn with Pillow (no plotting library on a small server)."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 16, 16, height - 36
    draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    points = [(s, v) for s, v in points if math.isfinite(v)]
    if len(points) >= 2:
        steps, losses = [s for s, _ in points], [v for _, v in points]
        s0, s1 = min(steps), max(steps) or 1
        l0, l1 = min(losses), max(losses)
        span_s, span_l = max(s1 - s0, 1), max(l1 - l0, 1e-9)

        def xy(step: int, loss: float) -> tuple[float, float]:
            return (left + (step - s0) / span_s * (right - left), bottom - (loss - l0) / span_l * (bottom - top))

        draw.line([xy(s, v) for s, v in points], fill=(31, 119, 180), width=2)
        for value in (l0, (l0 + l1) / 2, l1):
            y = xy(s0, value)[1]
            draw.text((4, y - 6), f"{value:.3f}", fill=(80, 80, 80))
        draw.text((left, bottom + 8), f"step {s0}", fill=(80, 80, 80))
        draw.text((right - 60, bottom + 8), f"step {s1}", fill=(80, 80, 80))
    else:
        draw.text((left + 10, (top + bottom) // 2), "not enough points yet", fill=(80, 80, 80))
    draw.text((left + 6, top + 4), "training loss", fill=(31, 119, 180))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class CardFacts:
    """What the model card says about the run."""

    run_id: str
    repo_id: str
    step: int
    loss: float
    model: dict
    image_size: int
    class_names: list[str]
    dataset: Optional[str] = None
    data: Optional[dict] = None  # the lease ledger's summary
    compression: Optional[str] = None
    history: list[dict] = field(default_factory=list)  # points with global_step, loss, samples_per_second, peers_online


def model_card(facts: CardFacts) -> str:
    loss = f"{facts.loss:.4f}" if math.isfinite(facts.loss) else "n/a"
    rows = _metric_rows(facts.history)
    data = facts.data or {}
    hub_dataset = facts.dataset if facts.dataset and is_hub_name(facts.dataset) else None
    lines = [
        "---",
        "library_name: timm",
        "license: apache-2.0",
        "tags: [image-classification, timm, convnext, convforever, decentralized-training]",
        *([f"datasets: [{hub_dataset}]"] if hub_dataset else []),
        "---",
        f"# ConvForever run `{facts.run_id}`: {facts.model['name']} at step {facts.step}",
        "",
        "Trained by volunteers with [ConvForever](https://github.com/convforever): a hivemind swarm of home GPUs "
        "averaging PowerSGD + 8-bit compressed gradients. This commit is the swarm's state at global step "
        f"{facts.step} (training loss {loss}); every checkpoint is a commit tagged `step-N`.",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{facts.model['name']}`, depths {facts.model['depths']}, dims {facts.model['dims']} |",
        f"| classes | {len(facts.class_names)}: {', '.join(facts.class_names[:12])}{' ...' if len(facts.class_names) > 12 else ''} |",
        f"| image size | {facts.image_size} px |",
        f"| data | {facts.dataset or 'peers own data'}"
        + (f"; {data.get('passes_completed', 0)} passes completed, {data.get('rows_used', 0)} rows used" if data else "") + " |",
        f"| gradient compression | {facts.compression or 'see the peers'} |",
        "",
        "## Training curve",
        "",
        "![training loss](loss.png)",
        "",
    ]
    if rows:
        lines += ["| global step | loss | samples/s | peers |", "|---:|---:|---:|---:|", *rows, ""]
    lines += [
        "## Evaluate or use it",
        "",
        "```bash",
        f"convforever-eval --checkpoint {facts.repo_id}@step-{facts.step} --data 'eval/*.parquet'",
        f"convforever-eval --checkpoint {facts.repo_id}@step-{facts.step} --image photo.jpg",
        "```",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("hf-hub:{facts.repo_id}", pretrained=True)  # pass revision via @step-N in the name',
        "```",
        "",
        f"Continue training from it: `convforever-peer --init-from {facts.repo_id}@step-{facts.step} ...`.",
        "",
    ]
    return "\n".join(lines)


def is_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and not Path(name).exists()


def _metric_rows(history: list[dict], max_rows: int = 12) -> list[str]:
    points = [p for p in history if p.get("global_step") is not None]
    if not points:
        return []
    stride = max(1, math.ceil(len(points) / max_rows))
    chosen = points[::stride]
    if chosen[-1] is not points[-1]:
        chosen.append(points[-1])

    def number(value, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "-"

    return [f"| {p['global_step']} | {number(p.get('loss'), '.4f')} | {number(p.get('samples_per_second'), '.1f')} | "
            f"{p.get('peers_online', '-')} |" for p in chosen]
