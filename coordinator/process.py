"""Process plumbing shared by the two long-running CLIs: logging, Ctrl+C, hivemind's signal habits."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)


def setup_logging(verbose: bool) -> None:
    # A crash in native code (torch, the p2p bindings, uvloop) then prints every thread's Python stack
    # to stderr, which is what a bug report needs; the cost is nothing until a fatal signal arrives.
    faulthandler.enable(all_threads=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("hivemind").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.INFO if verbose else logging.ERROR)  # CPU-kernel notices


def install_stop_handlers(stop: threading.Event) -> None:
    """First Ctrl+C/SIGTERM asks for a clean shutdown; a second one leaves at once.

    hivemind forks its DHT and averager processes after this runs, so they inherit the handler;
    in them it restores the default action, or hivemind could not terminate its own children.
    """
    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stop.is_set():
            raise SystemExit(128 + signum)
        logger.info(f"received {signal.Signals(signum).name}, shutting down (again to force)")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def keep_signal_handlers():
    """hivemind's averagers set SIGINT to "ignore" in the *calling* process when they start; undo that,
    or Ctrl+C would stop working once a peer or the coordinator has built one."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
