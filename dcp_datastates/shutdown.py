"""What an in-flight save does when the process exits.

Stock ``dcp.async_save`` runs the save on a ``concurrent.futures`` worker thread, which
the interpreter joins at exit: a script that returns, calls ``sys.exit`` or raises with
a save in flight waits for it, and the checkpoint completes. Ours must do the same,
so nothing in our save pipeline may depend on machinery that stops working at
interpreter shutdown (``concurrent.futures`` refuses new work once exit has begun):
the snapshot, sealer and pwrite workers are plain threads fed through queues.

Ctrl-C is different: the user wants the process gone, not a multi-GiB write finished.
When the main thread dies of ``KeyboardInterrupt``, a hook that runs *before* the
interpreter joins the save threads raises :data:`abandon` and every stage of the
pipeline (copy loop, sealer, objects thread) stops at its next step with
:class:`SaveAbandonedError`; in-flight disk writes finish (their buffers must come
back), the snapshot removes its files, ``write_data`` fails, and no ``.metadata`` is
written. SIGTERM with its default action kills the process at once; the atomic commit
guarantees that what it leaves is either a complete checkpoint or one without
``.metadata``. A program with its own SIGTERM handler can call
:func:`abandon_in_flight_saves` from it.
"""

from __future__ import annotations

import logging
import sys
import threading

from dcp_datastates.errors import SaveAbandonedError

logger = logging.getLogger("dcp_datastates")

#: Set once the process is being interrupted; checked by every stage of a save.
abandon = threading.Event()

_hook_lock = threading.Lock()
_hook_installed = False


def abandon_in_flight_saves(reason: str = "abandoned on request") -> None:
    """Make every save of this process stop at its next step (no ``.metadata`` is written).

    Irreversible for the process: meant for signal handlers and exit paths.
    """
    if not abandon.is_set():
        logger.warning("dcp_datastates: abandoning in-flight checkpoint saves (%s)", reason)
    abandon.set()


def check_not_abandoned() -> None:
    """Raise :class:`SaveAbandonedError` if the process is abandoning its saves."""
    if abandon.is_set():
        raise SaveAbandonedError(
            "checkpoint save abandoned: the process is being interrupted (Ctrl-C or "
            "abandon_in_flight_saves()); no .metadata was written, the previous checkpoint is untouched"
        )


def _interrupted_by_keyboard() -> bool:
    """True when the main thread ended with an uncaught KeyboardInterrupt.

    The interpreter prints an uncaught exception (setting ``sys.last_type``) before it
    starts finalizing; ``sys.exit`` does not set it.
    """
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return isinstance(last, KeyboardInterrupt)


def _at_exit() -> None:
    if _interrupted_by_keyboard():
        abandon_in_flight_saves("the process was interrupted with Ctrl-C")


def install_exit_hook() -> None:
    """Register :func:`_at_exit` to run before the interpreter joins worker threads (idempotent).

    ``threading._register_atexit`` hooks run in reverse order of registration, so ours --
    registered after ``concurrent.futures`` has registered its own -- runs before DCP's
    save thread is joined. (Plain ``atexit`` runs only after that join: too late.)
    """
    global _hook_installed
    with _hook_lock:
        if _hook_installed:
            return
        import concurrent.futures.thread  # noqa: F401 - make sure its hook is registered first

        register = getattr(threading, "_register_atexit", None)
        if register is None:  # not CPython: saves still complete at exit, Ctrl-C waits for them
            _hook_installed = True
            return
        try:
            register(_at_exit)
        except RuntimeError:  # already shutting down: nothing left to hook
            return
        _hook_installed = True
