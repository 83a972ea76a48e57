"""Real processes for the swarm tests: each in its own session, so a kill takes its hivemind children with it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional


def start(args: list[str], log: Path, env: Optional[dict] = None) -> subprocess.Popen:
    """Run ``args`` with stdout and stderr into ``log``, in a new session (its own process group).

    A peer forks its averagers and DHT and starts a p2p daemon; killing only the main process would leave them
    running (and their shared memory mapped), so the tests kill the whole group (``kill``).
    """
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its group, as a machine that loses power would."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_text(path: Path, proc: subprocess.Popen, timeout: float) -> str:
    """The contents of ``path`` once it is non-empty; fails early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text()
        assert proc.poll() is None, f"process exited early with {proc.returncode}"
        time.sleep(0.2)
    raise TimeoutError(path)


def wait_for_line(path: Path, proc: subprocess.Popen, pattern: str, timeout: float, offset: int = 0) -> re.Match:
    """The first match of ``pattern`` in ``path`` past ``offset`` characters; fails if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.compile(pattern).search(path.read_text(errors="replace"), offset) if path.is_file() else None
        if match:
            return match
        assert proc.poll() is None, f"{path.name}: exited with {proc.returncode}:\n{path.read_text()[-3000:]}"
        time.sleep(0.2)
    raise TimeoutError(f"{pattern!r} not in {path} within {timeout:.0f} s:\n{path.read_text()[-3000:]}")
