"""io_uring write engine (liburing Python binding) with GIL-free completion waits.

The binding's ``io_uring_wait_cqe`` is declared ``nogil`` but is called from Python
with the GIL held, so a thread blocked in it would stall training. Instead we
register an eventfd on the ring: the reaper thread blocks in ``os.read(eventfd)``,
which releases the GIL, and then drains completions with the non-blocking
``io_uring_peek_cqe``. Submission (any thread, under a lock) and reaping (one
thread) touch different ring halves, which liburing allows.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from dcp_datastates.native.engine import (
    MAX_RETRIES,
    TRANSIENT_ERRNOS,
    EngineUnavailable,
    WriteEngine,
    WriteRequest,
)

_WAKE_UP = 0  # user_data reserved for "no request": never assigned to a write

# The binding resolves its attributes lazily (dynamic-import), which is not thread-safe:
# two snapshots starting at once could see a half-initialised module. Load it once, locked.
_binding_lock = threading.Lock()
_binding: Any = None


def _load_binding() -> Any:
    global _binding
    with _binding_lock:
        if _binding is None:
            import liburing

            for name in ("io_uring", "io_uring_cqe", "io_uring_queue_init", "io_uring_register_eventfd",
                         "io_uring_get_sqe", "io_uring_prep_write", "io_uring_submit", "io_uring_peek_cqe",
                         "io_uring_cqe_seen", "io_uring_queue_exit"):
                getattr(liburing, name)  # resolve every lazy attribute while holding the lock
            _binding = liburing
        return _binding


@dataclass
class _InFlight:
    request: WriteRequest
    done: int = 0  # bytes already written (short writes are resubmitted for the rest)
    retries: int = 0


class IoUringWriteEngine(WriteEngine):
    name: ClassVar[str] = "io_uring"

    def __init__(self, queue_depth: int) -> None:
        try:
            liburing = _load_binding()
        except Exception as exc:  # ImportError, or an "Illegal instruction"-free failure to load
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
        self._in_flight: dict[int, _InFlight] = {}
        self._next_id = 1
        self._closing = False
        self._reaper = threading.Thread(target=self._reap_forever, name="dcp-datastates-uring", daemon=True)
        self._reaper.start()

    # -- submission ---------------------------------------------------------------------
    def submit(self, request: WriteRequest) -> None:
        if self._closing:
            raise RuntimeError("io_uring engine is closed")
        self._slots.acquire()
        with self._sq_lock:
            user_data = self._next_id
            self._next_id += 1
            self._in_flight[user_data] = _InFlight(request)
            self._queue_write(user_data)

    def _queue_write(self, user_data: int) -> None:
        """Prepare and submit the (remaining part of the) write; caller holds ``_sq_lock``."""
        entry = self._in_flight[user_data]
        view = entry.request.buffer[entry.done :]
        sqe = self._lib.io_uring_get_sqe(self._ring)
        self._lib.io_uring_prep_write(sqe, entry.request.fd, view, len(view), entry.request.offset + entry.done)
        sqe.user_data = user_data
        self._lib.io_uring_submit(self._ring)

    # -- completion ---------------------------------------------------------------------
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

    def _complete(self, user_data: int, result: int) -> None:
        entry = self._in_flight[user_data]
        request = entry.request
        remaining = len(request.buffer) - entry.done
        error: BaseException | None = None
        if result < 0:
            errno_ = -result
            if errno_ in TRANSIENT_ERRNOS and entry.retries < MAX_RETRIES:
                entry.retries += 1
                with self._sq_lock:
                    self._queue_write(user_data)
                return
            error = OSError(
                errno_,
                f"{os.strerror(errno_)} (io_uring write of {remaining} bytes to {request.path} "
                f"at offset {request.offset + entry.done})",
                request.path,
            )
        elif result < remaining:
            if result == 0:
                error = OSError(
                    28, f"io_uring wrote 0 bytes to {request.path} at offset {request.offset + entry.done}",
                    request.path,
                )
            else:
                entry.done += result  # short write: send the rest
                with self._sq_lock:
                    self._queue_write(user_data)
                return
        del self._in_flight[user_data]
        self._slots.release()
        request.on_done(error)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        os.eventfd_write(self._eventfd, 1)  # wake the reaper so it sees _closing
        self._reaper.join()
        self._lib.io_uring_queue_exit(self._ring)
        os.close(self._eventfd)
