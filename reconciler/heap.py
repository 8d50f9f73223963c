"""Building many long-lived objects at once without the cyclic garbage collector scanning them over and over.

A list builds the whole cache at once, and the leader's first observe pass an
observation of every resource: hundreds of thousands of objects that live as
long as the daemon and form no cycles. Python's collector would scan them
again at every threshold as they pile up (at 30,000 keys, 9 full collections
took 3.4 s of a 16.5 s start). `building` turns it off for the block, then
collects once, so that the cycles that became garbage meanwhile in any task (a
failed call's traceback, a finished task) are freed, and leaves what survives
out of every later collection (`gc.freeze`).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def building() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()  # before the freeze: a frozen cycle is never freed
        gc.freeze()
        if enabled:
            gc.enable()
