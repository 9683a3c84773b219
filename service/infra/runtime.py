"""Process-wide settings every long-running command of the service starts with."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import signal

# Collect the youngest generation after this many new container objects (net of those freed),
# not Python's 700. Under load the API's young generation filled dozens of times a second,
# and each collection promoted the objects of the requests then in flight, which later died in
# older generations and made full collections necessary (about 7% of a core at 1,000
# commands/s, and pauses).
YOUNG_GENERATION_THRESHOLD = 100_000
# The same for processes that apply batches of events (projector, rebuild). A batch allocates
# hundreds of thousands of rows, keys and records that live until it is applied (about a
# second) and are then freed by reference counting; a young collection in between traverses
# every one still alive, and achieves nothing. With 100,000, collections took about 15% of the
# projector's CPU (45.7-49.3 against 55.7-56.2 us per event, 1,000,000 events); with this many
# they run only when that many objects really pile up (cyclic garbage, growth).
BATCH_YOUNG_GENERATION_THRESHOLD = 1_000_000


def tune_gc(young_threshold: int = YOUNG_GENERATION_THRESHOLD) -> None:
    """Fewer, larger cyclic collections; what is loaded so far stays out of them for good.

    Called as a command starts, and again by the API once its app is built.
    """
    gc.collect()
    gc.freeze()  # modules, settings, metadata: never garbage, never traversed again
    gc.set_threshold(young_threshold, 20, 50)


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when its parent dies: a killed run leaves no orphan.

    For ``subprocess.Popen(preexec_fn=...)`` on Linux.
    """
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def shutdown_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (Ctrl-C, docker stop, kill): a graceful stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
