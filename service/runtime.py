"""Process-wide settings every long-running command of the service starts with."""

from __future__ import annotations

import gc

# Collect the youngest generation after this many new container objects, not Python's 700.
# A projector batch or a burst of commands allocates tens of thousands of short-lived dicts,
# lists and structs, most freed by reference counting; at 700 the cyclic collector ran
# hundreds of times per batch and took about a fifth of the projector's CPU time.
YOUNG_GENERATION_THRESHOLD = 20_000


def tune_gc() -> None:
    """Fewer, larger cyclic collections; what is loaded so far stays out of them for good.

    Called as a command starts, and again by the API once its app is built. Under load the
    young generation filled dozens of times a second, and each collection promoted the
    objects of the requests then in flight, which later died in older generations and made
    full collections necessary (about 7% of a core at 1,000 commands/s, and pauses).
    """
    gc.collect()
    gc.freeze()  # modules, settings, metadata: never garbage, never traversed again
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, 20, 50)
