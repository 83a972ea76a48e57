"""The peer's pure parts and its command-line contract."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from convforever.compression import TrafficSnapshot
from convforever.peer.cli import parse_args
from convforever.peer.recipe import lr_factor
from convforever.peer.report import ProgressWindow, RecentRounds, format_progress, human_bytes


def test_warmup_is_linear_in_the_global_step():
    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0) == 1.0


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(2_500) == "2.5 kB"
    assert human_bytes(3_200_000) == "3.2 MB"


def test_progress_window_means_and_totals():
    w = ProgressWindow()
    w.observe(2.0, 10, {"no_label": 1})
    w.observe(1.0, 30, {"no_label": 2, "corrupt_image": 1})
    loss, rate = w.close()
    assert loss == pytest.approx(1.25) and rate > 0
    assert w.samples == 40 and w.skipped == Counter(no_label=3, corrupt_image=1)
    assert w.close()[1] == 0.0  # a new window starts empty


def test_progress_line_has_every_field():
    traffic = TrafficSnapshot(grad_bytes_sent=200_000, grad_bytes_received=190_000, grad_rounds=4,
                              state_bytes_sent=0, state_bytes_received=0, state_rounds=0,
                              fp32_bytes_per_round=10_000_000)
    line = format_progress(12, 1.5, 33.3, 2, traffic, 2, Counter(no_label=3))
    for part in ("step 12", "loss 1.5000", "33.3 samples/s", "peers 2 (last group 2)", "sent 200.0 kB",
                 "recv 190.0 kB", "50.0 kB/round, 200x vs fp32", "skipped no_label 3"):
        assert part in line, line


def _traffic(sent: int, rounds: int, fp32: int = 10_000_000) -> TrafficSnapshot:
    return TrafficSnapshot(grad_bytes_sent=sent, grad_bytes_received=sent, grad_rounds=rounds, state_bytes_sent=0,
                           state_bytes_received=0, state_rounds=0, fp32_bytes_per_round=fp32,
                           grad_fp32_reference_bytes=fp32 * rounds)


def test_per_round_figures_follow_the_latest_rounds_not_the_warm_up():
    """Ten 8-bit warm-up rounds of 2.5 MB, then PowerSGD rounds of 50 kB: the line quotes the PowerSGD rounds."""
    recent = RecentRounds()
    assert recent.update(_traffic(0, 0)) is None
    assert recent.update(_traffic(25_000_000, 10)).bytes_per_round_sent == 2_500_000
    total = _traffic(25_000_000 + 2 * 50_000, 12)
    latest = recent.update(total)
    assert latest.grad_rounds == 2 and latest.bytes_per_round_sent == 50_000 and latest.ratio_vs_fp32 == 200
    assert recent.update(total) is latest  # a window without a round keeps the last figures
    line = format_progress(12, 1.5, 33.3, 2, total, 2, Counter(), latest)
    assert "50.0 kB/round, 200x vs fp32" in line and "sent 25.1 MB" in line, line


def test_cli_rejects_bad_input_with_the_flag_name(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--run-id", "r", "--data", "x", "--model", "convnext_gigantic"])
    assert "convnext_gigantic" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--run-id", "r", "--data", "x", "--depth", "2"])
    assert "depth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--run-id", "r", "--data", "x", "--batch-size", "64", "--target-batch-size", "32"])
    assert "--target-batch-size" in capsys.readouterr().err


def test_peer_with_no_data_files_says_what_to_fix(tmp_path):
    result = subprocess.run([sys.executable, "-m", "convforever.peer.cli", "--run-id", "r", "--data", str(tmp_path / "none*.parquet")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--data" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_stops_a_training_peer_cleanly(tmp_path):
    """A lone peer (a new swarm) trains; one SIGINT must end it within seconds, exit 0, no traceback."""
    import signal
    import time

    subprocess.run([sys.executable, "-m", "convforever.data.demo", "--out", str(tmp_path / "data"), "--train-rows", "200",
                    "--eval-rows", "20", "--image-size", "32"], check=True, capture_output=True)
    log = tmp_path / "peer.log"
    proc = subprocess.Popen([sys.executable, "-m", "convforever.peer.cli", "--run-id", "solo", "--data", str(tmp_path / "data" / "train"),
                             "--image-size", "32", "--batch-size", "8", "--target-batch-size", "32", "--report-every", "0.5",
                             "--num-workers", "1", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "samples/s" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_precision_resolution_and_messages():
    import torch

    from convforever.peer.accel import optimizer_class, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32" and not resolve_precision("fp32", cpu).scaled
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("bf16", cpu)
    with pytest.raises(ValueError, match="--precision"):
        resolve_precision("fp8", cpu)
    assert optimizer_class("adamw") is torch.optim.AdamW
    assert optimizer_class("adamw8bit").__name__ == "AdamW8bit"


@pytest.mark.slow
def test_lean_peer_trains_with_8bit_adamw_and_checkpointing(tmp_path):
    """A solo peer through the real CLI with the memory-saving options: it steps, and its weights move."""
    from convforever.data import write_demo_dataset
    from convforever.model.checkpoint import load_checkpoint

    write_demo_dataset(tmp_path / "data", train_rows=96, eval_rows=8, image_size=32, num_shards=1)
    result = subprocess.run(
        [sys.executable, "-m", "convforever.peer.cli", "--run-id", "lean", "--data", str(tmp_path / "data" / "train"),
         "--image-size", "32", "--batch-size", "8", "--target-batch-size", "16", "--max-steps", "2",
         "--optimizer", "adamw8bit", "--checkpointing", "--channels-last", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
         "--threads", "1", "--num-workers", "0", "--exit-grace", "0", "--save-on-exit", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpointing=True, optimizer=adamw8bit" in result.stderr and "channels_last=True" in result.stderr
    model, meta = load_checkpoint(tmp_path / "out")
    assert meta["step"] == 2
    import torch

    from convforever.model import ModelConfig, create_model
    from convforever.peer.trainer import initial_seed

    torch.manual_seed(initial_seed("lean"))
    start = create_model(ModelConfig())
    moved = sum((a - b).abs().sum().item() for a, b in zip(model.state_dict().values(), start.state_dict().values()))
    assert moved > 0
    wrong = subprocess.run([sys.executable, "-m", "convforever.peer.cli", "--run-id", "x", "--data", str(tmp_path / "data"),
                            "--precision", "bf16", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "needs a CUDA device" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.slow
def test_a_batch_with_a_non_finite_loss_is_skipped_not_averaged(tmp_path):
    """A peer whose every other forward pass gives NaN (tests/faulty_peer.py) keeps training on the good batches:
    its weights stay finite, and the progress line counts the dropped batches."""
    from convforever.data import write_demo_dataset
    from convforever.model.checkpoint import load_checkpoint

    write_demo_dataset(tmp_path / "data", train_rows=96, eval_rows=8, image_size=32, num_shards=1)
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("faulty_peer.py")), "nan-loss", "--", "--run-id", "nanloss",
         "--data", str(tmp_path / "data" / "train"), "--image-size", "32", "--batch-size", "8",
         "--target-batch-size", "16", "--max-steps", "3", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
         "--num-workers", "0", "--exit-grace", "0", "--report-every", "0.2", "--save-on-exit", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nonfinite_loss" in result.stdout, result.stdout[-3000:]
    model, meta = load_checkpoint(tmp_path / "out")
    assert meta["step"] == 3
    assert all(value.isfinite().all() for value in model.state_dict().values() if value.is_floating_point())
