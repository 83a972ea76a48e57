"""The coordinator's pure parts: swarm view, checkpoint schedule, status line, checkpoint files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hivemind.optim.progress_tracker import LocalTrainingProgress

from convforever.coordinator.protocol import EPOCH_SLACK, PeerMetrics, mean_loss, plausible_epoch_limit, swarm_view
from convforever.coordinator.service import CoordinatorConfig, checkpoint_due, format_status
from convforever.model import ModelConfig, create_model
from convforever.model import checkpoint as ckpt


def progress(epoch: int, samples: int = 0, rate: float = 10.0, client: bool = False, t: float = 100.0):
    return LocalTrainingProgress(peer_id=b"x", epoch=epoch, samples_accumulated=samples,
                                 samples_per_second=rate, time=t, client_mode=client)


def owned(*records) -> dict:
    """Progress records keyed by a distinct owner key each, as RunRecords.progress() returns them."""
    return {bytes([i]): record for i, record in enumerate(records)}


def metrics(loss: float, rate: float = 10.0, **kw) -> PeerMetrics:
    base = dict(peer_id="p", step=3, loss=loss, samples_per_second=rate, samples=100, bytes_sent=4000,
                bytes_received=4000, averaging_rounds=2, last_group_size=2, compression_ratio=50.0,
                skipped={"no_label": 2}, time=1.0)
    return PeerMetrics(**{**base, **kw})


def test_swarm_view_takes_the_largest_epoch_and_counts_only_its_samples():
    view = swarm_view(owned(progress(4, 30), progress(5, 10), progress(5, 20, client=True)), now=100.0)
    assert (view.global_step, view.num_peers, view.num_clients, view.samples_accumulated) == (5, 2, 1, 30)
    assert view.samples_per_second == pytest.approx(30.0)
    assert swarm_view({}, now=0).global_step == 0
    # a record stamped far in the future does not get to set the step
    assert swarm_view(owned(progress(3), progress(99, t=10_000.0)), now=100.0).global_step == 3


def test_a_far_future_epoch_claim_is_not_believed_unless_half_the_swarm_makes_it():
    honest = [progress(7, 30), progress(7, 20), progress(8, 5)]  # mid-transition: one peer already at 8
    liar = progress(10**6, 1000)
    view = swarm_view(owned(*honest, liar), now=100.0)
    assert (view.global_step, view.num_peers, view.samples_accumulated) == (8, 3, 5)
    assert swarm_view(owned(progress(0), progress(100)), now=100.0).global_step == 100  # a joiner sees the swarm
    # peers that have not trained yet publish no progress, but their metrics records vote
    alone = owned(liar)
    assert swarm_view(alone, now=100.0).global_step == 10**6
    assert swarm_view(alone, now=100.0, steps={b"h1": 0, b"h2": 0}).global_step == 0
    assert plausible_epoch_limit([10**6, 10**6, 3, 3]) == 10**6 + EPOCH_SLACK  # half the swarm can move it
    assert plausible_epoch_limit([10**6, 3, 3]) == 3 + EPOCH_SLACK


def test_checkpoint_schedule():
    assert not checkpoint_due(0, 0, 10)
    assert not checkpoint_due(9, 0, 10)
    assert checkpoint_due(10, 0, 10) and checkpoint_due(13, 0, 10)
    assert not checkpoint_due(13, 12, 10)  # step-12 already saved in this interval
    assert checkpoint_due(20, 12, 10)


def test_mean_loss_weights_by_throughput_and_ignores_nan():
    assert mean_loss([metrics(1.0, 10.0), metrics(2.0, 30.0), metrics(math.nan)]) == pytest.approx(1.75)
    assert math.isnan(mean_loss([]))


def test_status_line_shows_the_swarm():
    line = format_status(swarm_view(owned(progress(7, rate=12.5)), now=100.0), [metrics(0.5), metrics(0.7)], 5)
    for part in ("step 7", "peers 1", "loss 0.6000", "12.5 samples/s", "0.00 MB/round/peer (50x vs fp32)", "skipped 4",
                 "checkpoint step-5"):
        assert part in line, line


def test_status_line_quotes_the_latest_rounds_not_the_warm_up():
    # 10 warm-up rounds of 2.5 MB then PowerSGD rounds of 50 kB: the peer's own latest figure, not 25 MB / 12
    line = format_status(swarm_view(owned(progress(12)), now=100.0),
                         [metrics(0.5, bytes_sent=25_100_000, averaging_rounds=12, bytes_per_round=50_000.0)], None)
    assert "0.05 MB/round/peer (50x vs fp32)" in line, line


def test_config_validation_names_the_flag(tmp_path: Path):
    with pytest.raises(ValueError, match="--checkpoint-every"):
        CoordinatorConfig(run_id="r", checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(ValueError, match="--run-id"):
        CoordinatorConfig(run_id="a.b", checkpoint_dir=tmp_path)


def test_checkpoint_roundtrip_and_latest_pointer(tmp_path: Path):
    model = create_model(ModelConfig(name="convnext_atto", num_classes=7))
    meta = {"model": model.config.to_dict(), "image_size": 32, "class_names": list("abcdefg")}
    ckpt.save_checkpoint(tmp_path, 3, model.state_dict(), meta)
    path = ckpt.save_checkpoint(tmp_path, 6, model.state_dict(), meta)
    assert (tmp_path / "latest").read_text() == "step-6" and path == tmp_path / "step-6"
    loaded, config = ckpt.load_checkpoint(tmp_path)
    assert config["step"] == 6 and config["class_names"] == list("abcdefg")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(FileNotFoundError, match="--checkpoint-dir"):
        ckpt.resolve_checkpoint(tmp_path / "nothing-here")


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch):
    model = create_model(ModelConfig(name="convnext_atto", num_classes=3))
    meta = {"model": model.config.to_dict(), "image_size": 32, "class_names": ["a", "b", "c"]}
    ckpt.save_checkpoint(tmp_path, 1, model.state_dict(), meta)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model.state_dict(), meta)
    assert (tmp_path / "latest").read_text() == "step-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]  # no half-written folder left
    ckpt.load_checkpoint(tmp_path)


def test_identity_file_keeps_the_coordinator_address_across_restarts(tmp_path: Path):
    """Peers keep their --initial-peers line when the coordinator restarts with the same --identity."""
    import signal
    import subprocess
    import sys
    import time

    def start_and_read_maddrs() -> list[str]:
        maddrs = tmp_path / "maddrs.txt"
        maddrs.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "convforever.coordinator.cli", "--run-id", "r",
                                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                 "--maddrs-file", str(maddrs), "--identity", str(tmp_path / "keys" / "id.key")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while not (maddrs.is_file() and maddrs.read_text().strip()):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            return maddrs.read_text().split()
        finally:
            proc.send_signal(signal.SIGINT)
            output = proc.communicate(timeout=30)[0]
            assert proc.returncode == 0 and "Traceback" not in output, output

    first, second = start_and_read_maddrs(), start_and_read_maddrs()
    peer_id = lambda maddrs: {m.split("/p2p/")[1] for m in maddrs}
    assert len(peer_id(first)) == 1 and peer_id(first) == peer_id(second)
