"""Process plumbing shared by the two long-running CLIs: logging, Ctrl+C, hivemind's signal habits."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)


def enable_crash_traces() -> None:
    """On SIGSEGV/SIGBUS/SIGABRT, print every thread's Python stack to stderr before dying.

    A crash in native code (torch, the p2p bindings, uvloop) otherwise leaves only an exit code of -11, and the
    stacks are what a bug report needs; the cost is nothing until a fatal signal arrives.
    """
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, io.UnsupportedOperation):  # stderr is not a file (captured, closed)
        logger.debug("stderr has no file descriptor: no crash traces")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("hivemind").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.INFO if verbose else logging.ERROR)  # CPU-kernel notices


def no_main_thread_event_loop() -> None:
    """Leave the main thread without a default asyncio event loop.

    hivemind's MPFuture (every DHT call's result) remembers ``asyncio.get_event_loop()`` of the thread that made it.
    In a main thread that never runs a loop, that call creates one; when the future completes, hivemind's
    background thread then runs that loop itself (``run_until_complete``) to set an event nobody awaits, and a
    cancel from the main thread at the same moment would run it from a second thread. Without a default loop the
    futures of main-thread calls keep none, and completing them touches no loop. Every asyncio user in our
    processes runs its own loop in its own thread, so nothing needs the default one.
    """
    asyncio.set_event_loop(None)


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
