"""Bad input at the edges: every mistake a user can make on the command line ends in one line that names
the flag and the fix, never a traceback. Each case runs the real CLI as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from convforever.data import write_demo_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-errors")
    write_demo_dataset(root / "demo", train_rows=32, eval_rows=8, image_size=32, num_shards=1)
    return root / "demo" / "train"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def peer(data: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("convforever.peer.cli", "--run-id", "x", "--data", str(data), "--image-size", "32",
               "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *extra)


def assert_clean_error(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr[-2000:])


def test_malformed_multiaddr(data):
    assert_clean_error(peer(data, "--initial-peers", "not-a-multiaddr"), "--initial-peers not-a-multiaddr",
                       "must begin with /", "the multiaddrs are the ones it printed")


def test_unreachable_initial_peer(data):
    dead = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDMTonGTHNMCqUBfRqjJ8FTBWKd65DMB1mhuqYfuySgVK"
    assert_clean_error(peer(data, "--initial-peers", dead), "could not join the swarm", "Check that the coordinator is running")


def test_unknown_model_lists_the_valid_names(data):
    assert_clean_error(peer(data, "--model", "convnext_huge"), "unknown model name 'convnext_huge'", "convnext_tiny")


def test_data_path_with_no_files(tmp_path):
    assert_clean_error(run("convforever.peer.cli", "--run-id", "x", "--data", str(tmp_path / "nothing")),
                       "--data:", "no .parquet or .jsonl files found", "convforever-demo-data")


def test_unreachable_coordinator_api(data):
    # Leases (no --data) from a coordinator URL nothing listens on.
    result = run("convforever.peer.cli", "--run-id", "x", "--coordinator", "http://127.0.0.1:1", "--image-size", "32",
                 "--host-maddrs", "/ip4/127.0.0.1/tcp/0")
    assert_clean_error(result, "does not answer at http://127.0.0.1:1", "--coordinator URL")


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--image-size", "16", "--image-size must be >= 32"),
    ("--target-batch-size", "4", "--target-batch-size must be >= --batch-size"),
    ("--aa", "rand-x9", "rand"),
    ("--precision", "fp8", "--precision"),
    ("--powersgd-warmup", "-1", "--powersgd-warmup must be an integer >= 0"),
])
def test_peer_flag_values(data, flag, value, message):
    assert_clean_error(peer(data, flag, value), message)


def test_coordinator_dataset_with_no_files(tmp_path):
    result = run("convforever.coordinator.cli", "--run-id", "x", "--checkpoint-dir", str(tmp_path / "c"),
                 "--dataset", str(tmp_path / "nothing"), "--http-port", "0", "--host-maddrs", "/ip4/127.0.0.1/tcp/0")
    assert_clean_error(result, "no .parquet or .jsonl files found", "convforever-demo-data")


def test_coordinator_refuses_another_dataset_for_an_existing_plan(tmp_path, data):
    common = ["convforever.coordinator.cli", "--run-id", "x", "--checkpoint-dir", str(tmp_path / "c"), "--http-port", "0",
              "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--status-every", "0.2"]
    first = subprocess.Popen([sys.executable, "-m", *common, "--dataset", str(data)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if "HTTP API at" in line:
                break
    finally:
        first.terminate()
        first.wait(timeout=30)
    assert_clean_error(run(*common, "--dataset", str(tmp_path)), "holds the plan of dataset", "--checkpoint-dir")


def test_eval_of_a_missing_checkpoint(tmp_path, data):
    assert_clean_error(run("convforever.peer.evaluate", "--checkpoint", str(tmp_path / "none"), "--data", str(data)),
                       "no checkpoint at")
