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
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from dcp_datastates.native.engine import MAX_RETRIES, TRANSIENT_ERRNOS, EngineName, choose_engine
from dcp_datastates.native.uring_ring import InFlight, RingEngine
from dcp_datastates.native.workers import WorkerThreads

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
    """Open ``path`` read-only; O_DIRECT when asked and supported (tmpfs says EINVAL).

    Never through a symlink, and never blocking on a FIFO: a checkpoint's files were checked to
    be regular files, and these flags keep a file swapped in after that check from escaping it.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
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
    """Each request runs on one of ``threads`` workers (``workers``), as in the pwrite engine."""

    name: ClassVar[str] = "threads"

    def __init__(self, threads: int) -> None:
        self._workers: WorkerThreads[ReadRequest] = WorkerThreads(threads, self._run, "dcp-datastates-pread")

    def _run(self, request: ReadRequest) -> None:
        error: BaseException | None = None
        got = 0
        try:
            got = read_fully(request.fd, request.path, request.buffer, request.offset)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through on_done
            error = exc
        request.on_done(error, got)

    def submit(self, request: ReadRequest) -> None:
        self._workers.submit(request)

    def close(self) -> None:
        self._workers.close()


class IoUringReadEngine(RingEngine, ReadEngine):
    """Reads on the shared ring (``uring_ring``); a short read before end of file asks for the rest."""

    name: ClassVar[str] = "io_uring"

    def __init__(self, queue_depth: int) -> None:
        super().__init__(queue_depth, "dcp-datastates-uring-read")

    def submit(self, request: ReadRequest) -> None:
        if not len(request.buffer):
            request.on_done(None, 0)
            return
        self._track(request)

    def _prepare(self, sqe: Any, entry: InFlight) -> None:
        view = entry.request.buffer[entry.done :]
        self._lib.io_uring_prep_read(sqe, entry.request.fd, view, len(view), entry.request.offset + entry.done)

    def _complete(self, user_data: int, result: int) -> None:
        entry = self._in_flight[user_data]
        request: ReadRequest = entry.request
        error: BaseException | None = None
        if result < 0:
            if -result in TRANSIENT_ERRNOS and entry.retries < MAX_RETRIES:
                entry.retries += 1
                self._resubmit(user_data)
                return
            error = _read_error(-result, request.path, request.offset + entry.done,
                                len(request.buffer) - entry.done, "io_uring")
        elif result > 0:
            entry.done += result
            if entry.done < len(request.buffer):  # short read: ask for the rest (0 next time means end of file)
                self._resubmit(user_data)
                return
        self._finished(user_data)
        request.on_done(error, entry.done)


def create_read_engine(name: EngineName, *, io_threads: int, queue_depth: int) -> ReadEngine:
    """Build the read engine the config asks for (``engine.choose_engine``: the write side's rule)."""
    return choose_engine(name, lambda: IoUringReadEngine(queue_depth), lambda: ThreadPoolReadEngine(io_threads), "reading")
