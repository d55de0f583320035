"""Read engines: positional reads into caller-owned aligned buffers, many in flight.

The mirror of the write engines (``engine.py``): an engine takes a buffer, a file and an
offset, reads asynchronously, and calls ``on_done(error, nbytes)`` from its own thread
once the buffer holds every byte up to the end of the request or of the file. Engines
know nothing about tensors, records or checksums -- the read plan decides what to read,
the caller decides what the bytes mean. Two engines, byte-identical by test:

* ``IoUringReadEngine``: the kernel's async ring (liburing binding). Submission takes no
  thread, completions are reaped through an eventfd so nothing waits holding the GIL.
* ``ThreadPoolReadEngine``: a pool of ``os.preadv`` workers (the syscall releases the
  GIL), for kernels or sandboxes without io_uring.

With O_DIRECT (``open_for_read(..., direct=True)``) buffers, offsets and lengths must be
4096-aligned; page-aligned mmap buffers and block-aligned windows satisfy that. A read
that reaches end of file is short, not an error: ``nbytes`` says how much is valid.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from dcp_datastates.native.engine import MAX_RETRIES, TRANSIENT_ERRNOS, EngineName, EngineUnavailable

logger = logging.getLogger("dcp_datastates")


@dataclass
class ReadRequest:
    """Read up to ``len(buffer)`` bytes of ``fd`` at ``offset`` into ``buffer``.

    ``buffer`` must stay alive and untouched until ``on_done(error, nbytes)`` is called;
    ``nbytes < len(buffer)`` only when the file ends first. ``path`` names the file in errors.
    """

    fd: int
    path: str
    buffer: memoryview
    offset: int
    on_done: Callable[[BaseException | None, int], None]


@dataclass(frozen=True)
class OpenedReadFile:
    fd: int
    path: str
    direct: bool


def open_for_read(path: str, direct: bool) -> OpenedReadFile:
    """Open ``path`` read-only; O_DIRECT when asked and supported (tmpfs says EINVAL)."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return OpenedReadFile(os.open(path, flags | os.O_DIRECT), path, True)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            logger.info("dcp_datastates: %s refuses O_DIRECT; reading through the page cache", os.path.dirname(path))
    return OpenedReadFile(os.open(path, flags), path, False)


def _read_error(errno_: int, path: str, offset: int, length: int, how: str) -> OSError:
    return OSError(errno_, f"{os.strerror(errno_)} ({how} read of {length} bytes from {path} at offset {offset})", path)


def read_fully(fd: int, path: str, buffer: memoryview, offset: int) -> int:
    """preadv until ``buffer`` is full or the file ends; retry transient errors; name the file on failure."""
    done, retries = 0, 0
    while done < len(buffer):
        try:
            got = os.preadv(fd, [buffer[done:]], offset + done)
        except OSError as exc:
            if exc.errno in TRANSIENT_ERRNOS and retries < MAX_RETRIES:
                retries += 1
                continue
            raise _read_error(exc.errno or errno.EIO, path, offset + done, len(buffer) - done, "preadv") from exc
        if got == 0:
            break  # end of file
        done += got
    return done


class ReadEngine(ABC):
    """Asynchronous positional reads. Thread-safe ``submit``; ``close`` waits for pending reads."""

    name: ClassVar[str]

    @abstractmethod
    def submit(self, request: ReadRequest) -> None:
        """Queue a read; may block while the engine's queue is full (bounded in-flight I/O)."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine's threads and kernel resources."""


class ThreadPoolReadEngine(ReadEngine):
    """Each request runs on one of ``threads`` workers."""

    name: ClassVar[str] = "threads"

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dcp-datastates-pread")

    def _run(self, request: ReadRequest) -> None:
        error: BaseException | None = None
        got = 0
        try:
            got = read_fully(request.fd, request.path, request.buffer, request.offset)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through on_done
            error = exc
        request.on_done(error, got)

    def submit(self, request: ReadRequest) -> None:
        self._pool.submit(self._run, request)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


_WAKE_UP = 0  # user_data reserved for "no request"
_binding_lock = threading.Lock()
_binding: Any = None


def _load_binding() -> Any:
    """The liburing module with every attribute we use resolved once, under a lock (lazy import is not thread-safe)."""
    global _binding
    with _binding_lock:
        if _binding is None:
            import liburing

            for name in ("io_uring", "io_uring_cqe", "io_uring_queue_init", "io_uring_register_eventfd",
                         "io_uring_get_sqe", "io_uring_prep_read", "io_uring_submit", "io_uring_peek_cqe",
                         "io_uring_cqe_seen", "io_uring_queue_exit"):
                getattr(liburing, name)
            _binding = liburing
        return _binding


@dataclass
class _InFlight:
    request: ReadRequest
    done: int = 0  # bytes already read (short reads before end of file are resubmitted)
    retries: int = 0


class IoUringReadEngine(ReadEngine):
    name: ClassVar[str] = "io_uring"

    def __init__(self, queue_depth: int) -> None:
        try:
            liburing = _load_binding()
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
        self._in_flight: dict[int, _InFlight] = {}
        self._next_id = 1
        self._closing = False
        self._reaper = threading.Thread(target=self._reap_forever, name="dcp-datastates-uring-read", daemon=True)
        self._reaper.start()

    def submit(self, request: ReadRequest) -> None:
        if self._closing:
            raise RuntimeError("io_uring read engine is closed")
        if not len(request.buffer):
            request.on_done(None, 0)
            return
        self._slots.acquire()
        with self._sq_lock:
            user_data = self._next_id
            self._next_id += 1
            self._in_flight[user_data] = _InFlight(request)
            self._queue_read(user_data)

    def _queue_read(self, user_data: int) -> None:
        """Prepare and submit the (remaining part of the) read; caller holds ``_sq_lock``."""
        entry = self._in_flight[user_data]
        view = entry.request.buffer[entry.done :]
        sqe = self._lib.io_uring_get_sqe(self._ring)
        self._lib.io_uring_prep_read(sqe, entry.request.fd, view, len(view), entry.request.offset + entry.done)
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

    def _complete(self, user_data: int, result: int) -> None:
        entry = self._in_flight[user_data]
        request = entry.request
        error: BaseException | None = None
        if result < 0:
            if -result in TRANSIENT_ERRNOS and entry.retries < MAX_RETRIES:
                entry.retries += 1
                with self._sq_lock:
                    self._queue_read(user_data)
                return
            error = _read_error(-result, request.path, request.offset + entry.done,
                                len(request.buffer) - entry.done, "io_uring")
        elif result > 0:
            entry.done += result
            if entry.done < len(request.buffer):  # short read: ask for the rest (0 next time means end of file)
                with self._sq_lock:
                    self._queue_read(user_data)
                return
        del self._in_flight[user_data]
        self._slots.release()
        request.on_done(error, entry.done)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        os.eventfd_write(self._eventfd, 1)  # wake the reaper so it sees _closing
        self._reaper.join()
        self._lib.io_uring_queue_exit(self._ring)
        os.close(self._eventfd)


def create_read_engine(name: EngineName, *, io_threads: int, queue_depth: int) -> ReadEngine:
    """Build the read engine the config asks for; ``auto`` falls back to threads, saying why."""
    if name == "threads":
        return ThreadPoolReadEngine(io_threads)
    try:
        return IoUringReadEngine(queue_depth)
    except EngineUnavailable as exc:
        if name == "io_uring":
            raise EngineUnavailable(
                f"io_engine='io_uring' was asked for but io_uring cannot be used here: {exc}. "
                "Use io_engine='auto' or 'threads'."
            ) from exc
        logger.warning("dcp_datastates: io_uring unavailable (%s); reading with the threads engine", exc)
        return ThreadPoolReadEngine(io_threads)
