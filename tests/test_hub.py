"""The Hugging Face Hub paths, with the real huggingface_hub / datasets clients against tests/hub_server.py:
checkpoints published by the coordinator's uploader (commits, tags, model card), read back by revision for
evaluation and --init-from, and a dataset planned and streamed over ``hf://`` as the coordinator and the
peers do with Spawning/pd-extended.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import hub_server
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image

from convforever.coordinator.hub import CardFacts, HubConfig, HubPublisher, Upload, loss_curve_png, model_card
from convforever.data import CATEGORIES, write_demo_dataset
from convforever.data.loader import DataConfig, LocalShards, make_loader
from convforever.data.shards import iter_shard, plan_dataset
from convforever.model import ModelConfig, create_model
from convforever.model import checkpoint as ckpt

hub = hub_server.hub
REPO = "convforever-test/ConvForever-hubrun"


def _checkpoint(root: Path, step: int) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(step)
    model = create_model(ModelConfig(name="convnext_atto"))
    meta = {"model": model.config.to_dict(), "image_size": 32, "class_names": list(CATEGORIES), "run_id": "hubrun"}
    return ckpt.save_checkpoint(root, step, model.state_dict(), meta), model


def _upload(step_dir: Path, step: int, loss: float) -> Upload:
    history = [{"global_step": s, "loss": 4.0 - 0.1 * s, "samples_per_second": 300.0, "peers_online": 2}
               for s in range(step + 1)]
    facts = CardFacts(run_id="hubrun", repo_id=REPO, step=step, loss=loss, model=ModelConfig().to_dict(),
                      image_size=32, class_names=list(CATEGORIES), dataset="Spawning/pd-extended",
                      data={"passes_completed": 1, "rows_used": 1234}, compression="powersgd-8bit rank 4",
                      history=history)
    curve = [(p["global_step"], p["loss"]) for p in history]
    return Upload(step=step, step_dir=step_dir, loss=loss, card=model_card(facts), curve_png=loss_curve_png(curve))


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_publisher_commits_tags_and_card_then_eval_reads_by_revision(hub, tmp_path):
    first, model_3 = _checkpoint(tmp_path / "ckpt", 3)
    second, model_6 = _checkpoint(tmp_path / "ckpt", 6)
    publisher = HubPublisher(HubConfig(REPO))
    try:
        publisher.submit(_upload(first, 3, 3.7))
        _wait(lambda: publisher.published == [3])
        publisher.submit(_upload(second, 6, 3.4))
        _wait(lambda: publisher.published == [3, 6])
    finally:
        publisher.close()
    api = HfApi()
    commits = [c.title for c in api.list_repo_commits(REPO)]
    assert commits[:2] == ["step 6, loss 3.4000", "step 3, loss 3.7000"]  # one commit per checkpoint, one repo
    assert {t.name for t in api.list_repo_refs(REPO).tags} == {"step-3", "step-6"}
    assert set(api.list_repo_files(REPO)) >= {"model.safetensors", "config.json", "README.md", "loss.png"}
    card = hub.file_bytes(REPO, "README.md").decode()
    assert "library_name: timm" in card and "datasets: [Spawning/pd-extended]" in card
    assert "| 6 | 3.4000 |" in card and f"{REPO}@step-6" in card and "powersgd-8bit rank 4" in card
    assert Image.open(io.BytesIO(hub.file_bytes(REPO, "loss.png"))).size == (640, 320)
    config = json.loads(hub.file_bytes(REPO, "config.json", revision="step-3"))
    assert config["architecture"] == "convnext_atto" and config["convforever"]["step"] == 3

    # Reading back by tag gives that step's weights, not the newest.
    loaded, meta = ckpt.load_checkpoint(f"{REPO}@step-3")
    assert meta["step"] == 3
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model_3.state_dict().items())
    newest, meta = ckpt.load_checkpoint(REPO)
    assert meta["step"] == 6 and torch.equal(newest.state_dict()["head.fc.weight"], model_6.state_dict()["head.fc.weight"])
    with pytest.raises(FileNotFoundError, match="no revision 'step-99'"):
        ckpt.fetch_checkpoint(f"{REPO}@step-99")
    with pytest.raises(FileNotFoundError, match="no model repository"):
        ckpt.fetch_checkpoint("convforever-test/nothing-here")


def test_eval_cli_downloads_from_the_hub(hub, tmp_path):
    step_dir, _ = _checkpoint(tmp_path / "ckpt", 4)
    HfApi().create_repo(REPO, exist_ok=True)
    HfApi().upload_folder(repo_id=REPO, folder_path=str(step_dir), commit_message="step 4")
    HfApi().create_tag(REPO, tag="step-4")
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (10, 200, 10)).save(image)
    env = {**hub.client_env(tmp_path / "sub-hf-home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "convforever.peer.evaluate", "--checkpoint", f"{REPO}@step-4",
                             "--image", str(image)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 5


def test_upload_errors_are_explained_once_and_the_checkpoint_stays(hub, tmp_path, caplog):
    step_dir, _ = _checkpoint(tmp_path / "ckpt", 2)
    caplog.set_level(logging.INFO, logger="convforever.coordinator.hub")
    publisher = HubPublisher(HubConfig(REPO, token=hub.readonly_token, max_backoff=0.2))
    try:
        publisher.submit(_upload(step_dir, 2, 1.0))
        _wait(lambda: publisher.last_error is not None)
        time.sleep(0.6)  # a few retries
    finally:
        publisher.close(timeout=0.1)
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and "403" in failures[0] and "write access" in failures[0]
    assert not any(r.exc_info for r in caplog.records)  # a message, not a traceback
    assert publisher.published == [] and (step_dir / "model.safetensors").is_file()


def test_coordinator_without_a_token_says_how_to_get_one(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "empty-home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "convforever.coordinator.cli", "--run-id", "r", "--checkpoint-dir",
                             str(tmp_path / "c"), "--org", "someone"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0 and "HF_TOKEN" in result.stderr and "someone/ConvForever-r" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "convforever.coordinator.cli", "--run-id", "r", "--checkpoint-dir",
                          str(tmp_path / "c"), "--hub-repo", "no-slash"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "ORG/NAME" in bad.stderr


def test_hub_dataset_is_planned_from_footers_and_streamed_over_hf(hub, tmp_path):
    demo = write_demo_dataset(tmp_path / "demo", train_rows=300, eval_rows=10, image_size=32, num_shards=2)
    files = {f"pd12m/{Path(f).name}": Path(f).read_bytes() for f in demo.train_files}
    files["megalith-cc0/other.parquet"] = Path(demo.eval_files[0]).read_bytes()
    hub.seed_dataset("Spawning-test/pd-mini", files)

    plan = plan_dataset("Spawning-test/pd-mini", shard_rows=100, subset="pd12m")
    assert plan.root == "hf://datasets/Spawning-test/pd-mini"
    assert {s.path for s in plan.shards} == set(files) - {"megalith-cc0/other.parquet"}
    assert plan.num_rows == 300
    local_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in demo.train_files)
    streamed = [row for shard in plan.shards for row in iter_shard(plan.root, shard)]
    assert len(streamed) == local_rows and all(r.image or r.caption for r in streamed)
    resumed = list(iter_shard(plan.root, plan.shards[0], start_row=50))
    assert [r.id for r in resumed] == [r.id for r in streamed[50:plan.shards[0].num_rows]]
    # Files are read in byte ranges (footers, row groups), never downloaded whole before training starts.
    reads = [r for r in hub.log if r.method == "GET" and "/resolve/" in r.path]
    assert reads and all(r.range and r.status == 206 for r in reads)

    batches = make_loader(DataConfig(files="", image_size=32, batch_size=16, train=False),
                          source=LocalShards(plan, train=False, seed=0))
    labels = [label for batch in batches for label in batch.labels.tolist()]
    assert 0 < len(labels) <= 300 and set(labels) <= set(range(len(CATEGORIES)))

