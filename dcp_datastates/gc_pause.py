"""Pause Python's cyclic garbage collector while a save or load builds its many small objects.

Planning and describing 50,000 tensors makes ~10 Python objects per tensor that all survive
(write items, chunk records, metadata entries), and each burst of survivors triggers a full
collection that walks the whole heap again: measured, ~40% of a 50k-tensor save or load. The
objects hold no cycles worth collecting, and reference counting still frees everything the
moment it is dropped, so the collector is paused for those phases and resumed after.

The collector's switch is process-wide, so pauses are counted: the first pause (of any thread)
switches it off and the last one switches it back *only if it was on before*; a user who
turned it off keeps it off. A process forked while a pause is open (a data loader's worker
during a background save) starts with the collector as it was before the pause.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_open = 0
_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the block with the cyclic collector off (reentrant, thread-safe, fork-safe)."""
    global _open, _was_enabled
    entered = False
    try:
        with _lock:
            first = _open == 0
            _open, entered = _open + 1, True  # counted before any call a Ctrl-C could interrupt
            if first:
                _was_enabled = gc.isenabled()
                gc.disable()
        yield
    finally:
        if entered:  # a Ctrl-C before the count went up must not take another pause's count down
            with _lock:
                _open -= 1
                if _open == 0 and _was_enabled:
                    gc.enable()


def pauses_open() -> int:
    """How many pauses are open now (for tests and logs)."""
    return _open


def _reset_in_child() -> None:
    """A forked child has no thread inside a pause: give it the collector as it was before."""
    global _lock, _open
    _lock = threading.Lock()
    if _open and _was_enabled:
        gc.enable()
    _open = 0


os.register_at_fork(after_in_child=_reset_in_child)
