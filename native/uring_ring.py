"""The io_uring plumbing both io_uring engines share: the binding, one ring, a GIL-free reaper.

The binding's ``io_uring_wait_cqe`` is declared ``nogil`` but is called from Python
with the GIL held, so a thread blocked in it would stall training. Instead we
register an eventfd on the ring: the reaper thread blocks in ``os.read(eventfd)``,
which releases the GIL, and then drains completions with the non-blocking
``io_uring_peek_cqe``. Submission (any thread, under a lock) and reaping (one
thread) touch different ring halves, which liburing allows.

``RingEngine`` keeps the bookkeeping (a bounded number of requests in flight, one id
per request, resubmission of the rest of a short transfer); the write and read engines
say only how an operation is prepared and what a completion means.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import threading
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dcp_datastates.native.engine import EngineUnavailable
from dcp_datastates.native.workers import start_without_interrupts

_WAKE_UP = 0  # user_data reserved for "no request": never assigned to an operation

# The binding resolves its attributes lazily (dynamic-import), which is not thread-safe:
# two snapshots starting at once could see a half-initialised module. Load it once, locked
# (and, across processes, see ``_import_binding``).
_BINDING_ATTRIBUTES = (
    "io_uring", "io_uring_cqe", "io_uring_queue_init", "io_uring_register_eventfd", "io_uring_get_sqe",
    "io_uring_prep_write", "io_uring_prep_read", "io_uring_submit", "io_uring_peek_cqe", "io_uring_cqe_seen",
    "io_uring_queue_exit",
)
_binding_lock = threading.Lock()
_binding: Any = None
_binding_failure: Exception | None = None


def load_binding() -> Any:
    """The liburing module with every attribute the engines use resolved once, under a lock.

    A failed import is remembered and raised again: importing the binding a second time after
    a failure yields an empty module, whose "no attribute 'io_uring'" would hide the cause.
    """
    global _binding, _binding_failure
    with _binding_lock:
        if _binding is None:
            if _binding_failure is not None:
                raise _binding_failure.with_traceback(None)  # a fresh traceback each time, not a growing one
            try:
                _binding = _import_binding()
            except Exception as exc:  # ImportError, or a binding that fails to load
                _binding_failure = exc
                raise
        return _binding


def _import_binding() -> Any:
    """``import liburing`` with its attributes resolved, without writing into the installed package.

    The binding's loader (dynamic-import, which liburing 2024.5.3 uses) removes and rewrites a
    cache file inside the installed package on every import, though it never reads it back (it
    rescans the package each time). Where the package is read-only -- a container image, a
    cluster's shared software tree, a non-root user of a system install -- the import fails
    (EROFS, EACCES) and io_uring is lost; where ranks start together they race on the file, and
    one sees it vanish mid-import (``FileNotFoundError``). So the import runs with the loader's
    cache writes off. Only where they cannot be switched off (a loader we do not know) do the
    imports take turns, under an exclusive ``flock`` on the package's ``__init__.py``: on a
    shared software tree that lock can span every node of the job, so it is not taken otherwise.
    """
    with _without_loader_cache_writes() as writes_off, \
            contextlib.nullcontext() if writes_off else _one_process_at_a_time():
        import liburing  # not installed: the ImportError says so

        for name in _BINDING_ATTRIBUTES:
            getattr(liburing, name)
        return liburing


@contextlib.contextmanager
def _one_process_at_a_time() -> Iterator[None]:
    """Hold an exclusive ``flock`` on the binding's ``__init__.py`` (no lock where it cannot be opened)."""
    try:
        spec = importlib.util.find_spec("liburing")
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules (None)
        spec = None
    try:
        fd = os.open(spec.origin, os.O_RDONLY | os.O_CLOEXEC) if spec is not None and spec.origin else -1
    except OSError:
        fd = -1
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # NFS (EBADF on a read-only descriptor), Lustre without flock (ENOSYS): unlocked
                pass
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


_LOADER_CACHE_STEPS = ("exists", "create_cache_dir", "dump_cache", "add_record")


@contextlib.contextmanager
def _without_loader_cache_writes() -> Iterator[bool]:
    """While the binding is imported, dynamic-import's loader finds no cache file and writes none.

    Its ``importer`` then scans the package, as it does anyway, and skips creating the cache
    directory, writing the cache and recording it in the package's ``RECORD``. Yields whether
    it could: another loader (other names) is left alone.
    """
    try:
        loader = importlib.import_module("dynamic_import.importer")
    except ImportError:
        loader = None
    if loader is None or not all(callable(getattr(loader, name, None)) for name in _LOADER_CACHE_STEPS):
        yield False
        return
    saved = {name: getattr(loader, name) for name in _LOADER_CACHE_STEPS}
    loader.exists = lambda path: False
    loader.create_cache_dir = loader.dump_cache = loader.add_record = lambda *args, **kwargs: None
    try:
        yield True
    finally:
        for name, step in saved.items():
            setattr(loader, name, step)


_problem_lock = threading.Lock()
_problem: list[str | None] = []  # [] until probed, then [reason or None]


def io_uring_problem() -> str | None:
    """Why an io_uring ring cannot be used in this process, or ``None`` where it can (probed once, cached).

    Imports the binding and sets up (and tears down) a two-entry ring: the same two steps
    that fail where liburing is not installed, or where ``kernel.io_uring_disabled`` or a
    seccomp filter refuses the ring. Milliseconds, once per process.
    """
    with _problem_lock:
        if not _problem:
            _problem.append(_probe())
        return _problem[0]


def _probe() -> str | None:
    try:
        liburing = load_binding()
    except Exception as exc:  # ImportError, or a binding that fails to load
        return f"the liburing binding cannot be imported ({exc})"
    ring = liburing.io_uring()
    try:
        liburing.io_uring_queue_init(2, ring, 0)
    except OSError as exc:  # ENOSYS (seccomp), EPERM (kernel.io_uring_disabled), ENOMEM
        return f"io_uring_queue_init failed: {exc}"
    liburing.io_uring_queue_exit(ring)
    return None


@dataclass
class InFlight:
    """One request on the ring: ``done`` bytes already transferred (the rest is resubmitted)."""

    request: Any
    done: int = 0
    retries: int = 0


class RingEngine:
    """A ring with at most ``queue_depth`` requests in flight and a reaper thread calling ``_complete``."""

    def __init__(self, queue_depth: int, thread_name: str) -> None:
        try:
            liburing = load_binding()
        except Exception as exc:  # ImportError, or a binding that fails to load
            raise EngineUnavailable(f"the liburing binding cannot be imported ({exc})") from exc
        self._lib = liburing
        self._ring = liburing.io_uring()
        self._cqe = liburing.io_uring_cqe()
        try:
            liburing.io_uring_queue_init(max(queue_depth, 2), self._ring, 0)
        except OSError as exc:  # ENOSYS (seccomp), EPERM (kernel.io_uring_disabled), ENOMEM
            raise EngineUnavailable(f"io_uring_queue_init failed: {exc}") from exc
        self._eventfd = os.eventfd(0, os.EFD_CLOEXEC)
        liburing.io_uring_register_eventfd(self._ring, self._eventfd)
        self._slots = threading.BoundedSemaphore(queue_depth)
        self._sq_lock = threading.Lock()
        self._in_flight: dict[int, InFlight] = {}
        self._next_id = 1
        self._closing = False
        self._reaper = threading.Thread(target=self._reap_forever, name=thread_name, daemon=True)
        start_without_interrupts(self._reaper)

    # -- what the engines say -------------------------------------------------------------
    @abstractmethod
    def _prepare(self, sqe: Any, entry: InFlight) -> None:
        """Prepare ``sqe`` for the part of ``entry`` not yet transferred."""

    @abstractmethod
    def _complete(self, user_data: int, result: int) -> None:
        """Handle one completion: ``_resubmit``, or ``_finished`` and report to the caller."""

    # -- bookkeeping ----------------------------------------------------------------------
    def _track(self, request: Any) -> None:
        """Put ``request`` on the ring; blocks while ``queue_depth`` requests are in flight."""
        if self._closing:
            raise RuntimeError("io_uring engine is closed")
        self._slots.acquire()
        with self._sq_lock:
            user_data = self._next_id
            self._next_id += 1
            self._in_flight[user_data] = InFlight(request)
            self._queue(user_data)

    def _resubmit(self, user_data: int) -> None:
        """Submit the rest of a request again (a short transfer, or a transient error)."""
        with self._sq_lock:
            self._queue(user_data)

    def _finished(self, user_data: int) -> InFlight:
        """Forget a request that is done (or failed) and free its slot."""
        entry = self._in_flight.pop(user_data)
        self._slots.release()
        return entry

    def _queue(self, user_data: int) -> None:
        """Prepare and submit; caller holds ``_sq_lock``."""
        sqe = self._lib.io_uring_get_sqe(self._ring)
        self._prepare(sqe, self._in_flight[user_data])
        sqe.user_data = user_data
        self._lib.io_uring_submit(self._ring)

    def _reap_forever(self) -> None:
        lib = self._lib
        while True:
            os.read(self._eventfd, 8)  # blocks without holding the GIL
            while lib.io_uring_peek_cqe(self._ring, self._cqe) == 0:
                result, user_data = self._cqe.res, self._cqe.user_data
                lib.io_uring_cqe_seen(self._ring, self._cqe)
                if user_data != _WAKE_UP:
                    self._complete(user_data, result)
            if self._closing and not self._in_flight:
                return

    def close(self) -> None:
        """Wait for every request in flight, then release the ring (idempotent)."""
        if self._closing:
            return
        self._closing = True
        os.eventfd_write(self._eventfd, 1)  # wake the reaper so it sees _closing
        self._reaper.join()
        self._lib.io_uring_queue_exit(self._ring)
        os.close(self._eventfd)
