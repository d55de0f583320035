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

import os
import threading
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from dcp_datastates.native.engine import EngineUnavailable
from dcp_datastates.native.workers import start_without_interrupts

_WAKE_UP = 0  # user_data reserved for "no request": never assigned to an operation

# The binding resolves its attributes lazily (dynamic-import), which is not thread-safe:
# two snapshots starting at once could see a half-initialised module. Load it once, locked.
_BINDING_ATTRIBUTES = (
    "io_uring", "io_uring_cqe", "io_uring_queue_init", "io_uring_register_eventfd", "io_uring_get_sqe",
    "io_uring_prep_write", "io_uring_prep_read", "io_uring_submit", "io_uring_peek_cqe", "io_uring_cqe_seen",
    "io_uring_queue_exit",
)
_binding_lock = threading.Lock()
_binding: Any = None


def load_binding() -> Any:
    """The liburing module with every attribute the engines use resolved once, under a lock."""
    global _binding
    with _binding_lock:
        if _binding is None:
            import liburing

            for name in _BINDING_ATTRIBUTES:
                getattr(liburing, name)
            _binding = liburing
        return _binding


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
