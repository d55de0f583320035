"""What an in-flight save does when the process exits or is interrupted.

Stock ``dcp.async_save`` runs the save on a ``concurrent.futures`` worker thread, which
the interpreter joins at exit: a script that returns, calls ``sys.exit`` or raises with
a save in flight waits for it, and the checkpoint completes. Ours must do the same,
so nothing in our save pipeline may depend on machinery that stops working at
interpreter shutdown (``concurrent.futures`` refuses new work once exit has begun):
the snapshot, sealer and pwrite workers are plain threads fed through queues.

An interrupt is different: the user wants the process gone, not a multi-GiB write
finished. Every save registers an :class:`InFlightSave` from its start (``stage()`` or
``prepare_local_plan``) to its end; :func:`abandon_in_flight_saves` cancels those in
flight at that moment (saves started later are not affected: a program that catches
``KeyboardInterrupt`` may still save a final checkpoint). A cancelled save stops at the
next step of every stage (copy loop, sealer, objects thread) with
:class:`SaveAbandonedError`; in-flight disk writes finish (their buffers must come
back), its files are removed, and no ``.metadata`` is published. The commit is atomic
with respect to cancellation (:meth:`InFlightSave.commit_point`): a cancel either lands
before the rename of ``.metadata`` -- nothing is published -- or it is refused because
the rename is under way, and the save completes.

Who cancels: the signal handlers of ``signals`` (SIGINT, SIGTERM) the moment the signal
is handled, while a save is in flight; and, for saves a signal handler does not cover
(started off the main thread, or under a program's own handler), a hook that runs when
the main thread dies of ``KeyboardInterrupt``, before the interpreter joins the save
threads. A program with its own handlers calls :func:`abandon_in_flight_saves` from them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dcp_datastates.dir_files import only_ours
from dcp_datastates.errors import SaveAbandonedError, unwrap

logger = logging.getLogger("dcp_datastates")

_registry_lock = threading.Lock()
_in_flight: set["InFlightSave"] = set()
_hook_lock = threading.Lock()
_hook_installed = False


class InFlightSave:
    """One save of this rank, from its start to its commit (or failure), and whether it was cancelled.

    ``directory`` and the file-name tags (``__<rank>_<tag>_...``, unique to the save) say
    which files are the save's own, so they can be removed whoever notices the abandonment.
    """

    def __init__(self, directory: Path, tag: str, rank: int, *, coordinator: bool, driver: threading.Thread | None) -> None:
        self.directory = directory
        self.rank = rank
        self.coordinator = coordinator
        #: The thread whose Python runs the save (``dcp.save``), or ``None`` for background threads (``async_save``).
        self.driver = driver
        self._tags = {tag}
        self._lock = threading.RLock()  # re-entrant: a signal handler may run on the thread that holds it
        self.reason: str | None = None
        self.committing = False
        self.committer: threading.Thread | None = None
        self.handed_over = False
        #: A SIGTERM handled while this thread was committing: delivered once the commit ends.
        self.deferred_signal: int | None = None
        self.release: Callable[[], None] | None = None  # frees the save's directory lock
        self.ended = threading.Event()
        #: Set when a thread working for the save (the snapshot's) has stopped and removed its files.
        self.workers: list[threading.Event] = []

    # -- the save's side -------------------------------------------------------------------------
    def add_tag(self, tag: str) -> None:
        with self._lock:
            self._tags.add(tag)

    def check(self) -> None:
        """Raise :class:`SaveAbandonedError` if this save was cancelled."""
        if self.reason is not None:
            raise SaveAbandonedError(
                f"checkpoint save into {str(self.directory)!r} abandoned ({self.reason}); no .metadata was "
                "written, its files are removed, and the previous checkpoint is untouched"
            )

    @contextlib.contextmanager
    def commit_point(self) -> Iterator[None]:
        """Around the rename that publishes ``.metadata``: refuse if cancelled, else refuse cancels from now on."""
        with self._lock:
            self.check()
            self.committing = True
            self.committer = threading.current_thread()
        try:
            yield
        finally:
            deferred, self.deferred_signal = self.deferred_signal, None
            if deferred is not None:  # the commit is over (done or failed): now the signal's default action
                from dcp_datastates.signals import die_of

                die_of(deferred)

    def hand_over(self) -> None:
        """A non-coordinator rank reported its files: from now on the coordinator's commit decides about them."""
        with self._lock:
            self.check()
            self.handed_over = True

    def end(self) -> None:
        """The save is over for this rank (committed, handed over, failed or abandoned). Idempotent."""
        with _registry_lock:
            _in_flight.discard(self)
        self.ended.set()

    # -- the canceller's side ----------------------------------------------------------------------
    def cancel(self, reason: str) -> bool:
        """Mark the save abandoned; ``False`` if it was already, or is committing (it completes), or is over."""
        with self._lock:
            if self.committing or self.ended.is_set() or self.reason is not None:
                return False
            self.reason = reason
            return True

    @property
    def abandoned(self) -> bool:
        return self.reason is not None

    def remove_files(self, *, all_ranks: bool = False) -> list[str]:
        """Remove this save's files -- never once it may be published, or handed to the coordinator."""
        with self._lock:
            if self.reason is None and not all_ranks:
                return []
            if self.committing or (self.handed_over and not self.coordinator):
                return []
            tags = "|".join(re.escape(t) for t in sorted(self._tags))
        rank = r"\d+" if all_ranks else str(self.rank)
        pattern = re.compile(rf"^(__{rank}_({tags})_.*|\.metadata\.({tags})\.tmp)$")
        removed = []
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return []
        for entry in entries:
            if pattern.match(entry.name) and _only_ours(entry):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
        return removed


def _only_ours(entry: os.DirEntry[str]) -> bool:
    try:
        return only_ours(entry.stat(follow_symlinks=False))
    except FileNotFoundError:
        return False


def begin_save(directory: Path, tag: str, rank: int, *, coordinator: bool, background: bool) -> InFlightSave:
    """Register a save that starts now (and cover it with the signal handlers where this is the main thread)."""
    save = InFlightSave(directory, tag, rank, coordinator=coordinator, driver=None if background else threading.current_thread())
    with _registry_lock:
        _in_flight.add(save)
    install_exit_hook()
    from dcp_datastates.signals import cover_saves

    cover_saves()
    return save


def in_flight() -> list[InFlightSave]:
    with _registry_lock:
        return list(_in_flight)


def abandon_in_flight_saves(reason: str = "abandoned on request") -> list[InFlightSave]:
    """Make every save of this process in flight now stop at its next step; no ``.metadata`` is written.

    Returns the saves cancelled (a save already renaming its ``.metadata`` into place is
    not: it completes). Saves started afterwards are not affected. Safe to call from a
    signal handler.
    """
    cancelled = [save for save in in_flight() if save.cancel(reason)]
    if cancelled:
        logger.warning("dcp_datastates: abandoning in-flight checkpoint saves (%s): %s", reason,
                       ", ".join(sorted(str(s.directory) for s in cancelled)))
    return cancelled


def wait_until_stopped(saves: list[InFlightSave], here: threading.Thread, timeout: float) -> None:
    """Wait (at most ``timeout`` seconds in all) until each save has ended -- or, for a save driven by
    ``here`` (which cannot end while ``here`` waits), until the threads it started have stopped."""
    deadline = time.monotonic() + timeout
    for save in saves:
        left = max(0.0, deadline - time.monotonic())
        if save.driver is here:
            for stopped in list(save.workers):
                stopped.wait(left)
        else:
            save.ended.wait(left)


def check_not_abandoned(save: InFlightSave | None) -> None:
    """Raise :class:`SaveAbandonedError` if ``save`` was cancelled (``None``: a save nobody cancels)."""
    if save is not None:
        save.check()


def _interrupted_by_keyboard() -> bool:
    """True when the main thread ended with an uncaught KeyboardInterrupt (also one DCP wrapped).

    The interpreter prints an uncaught exception (setting ``sys.last_type``) before it
    starts finalizing; ``sys.exit`` does not set it.
    """
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return last is not None and isinstance(unwrap(last), KeyboardInterrupt)


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
