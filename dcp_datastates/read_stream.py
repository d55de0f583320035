"""Stream a read plan's windows through reusable aligned buffers, many reads in flight, in order.

The mirror of ``chunk_stream`` on the write side: a load checks out a pool of page-aligned
host buffers (pinned with CUDA, so host-to-device copies from them are asynchronous),
keeps up to one read per buffer in flight through a read engine, and hands the caller
each window in file order as soon as its bytes have landed -- while the reads of the
following windows are still running. A window is checked (its checksums) by the thread
that saw its read complete, before the caller gets it: checking overlaps the caller's
delivery of the windows before it instead of adding to it (the hash releases the GIL).
The caller delivers a window, then the buffer goes straight back into the queue for the
next read.

Pools are kept per process and reused by later loads (allocation and pinning cost far
more than reading into memory that is already there); a pool is used by one load at a
time, so concurrent loads never wait on each other's buffers (one idle pool per geometry
is kept; ``release_idle_pools`` frees it). Buffer pages are faulted in by the first read
into them, so a small load of a large pool only touches what it reads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dcp_datastates.buffer_pool import HostBuffer, HostBufferPool
from dcp_datastates.native import ReadEngine, ReadRequest
from dcp_datastates.read_plan import Window

_idle_pools: dict[tuple[int, int, bool], list[HostBufferPool]] = {}
_idle_lock = threading.Lock()


@contextlib.contextmanager
def checkout_pool(buffer_bytes: int, count: int, pin: bool) -> Iterator[HostBufferPool]:
    """A pool for one load: an idle one of this geometry if the process has one, else a new one."""
    key = (buffer_bytes, count, pin)
    with _idle_lock:
        idle = _idle_pools.get(key)
        pool = idle.pop() if idle else None
    if pool is None:
        pool = HostBufferPool(buffer_bytes, count, pin)
    try:
        yield pool
    finally:
        if pool.in_use == 0:  # a pool with a read still in flight (should not happen) is never reused
            with _idle_lock:
                idle = _idle_pools.setdefault(key, [])
                if not idle:  # keep one per geometry: concurrent loads' extra pools are freed
                    idle.append(pool)


def release_idle_pools() -> int:
    """Drop the pools kept for later loads (frees their host memory); returns how many."""
    with _idle_lock:
        count = sum(len(pools) for pools in _idle_pools.values())
        _idle_pools.clear()
    return count


#: ``check(window, data)``: raises if ``data`` (the window's bytes) is not what was saved;
#: returns whether it checked anything (a file saved without checksums has nothing to check)
WindowCheck = Callable[[Window, memoryview], bool]


@dataclass
class _Pending:
    window: Window
    buffer: HostBuffer
    done: threading.Event
    error: BaseException | None = None
    nbytes: int = 0
    checked: bool = False
    check_seconds: float = 0.0


@dataclass(frozen=True)
class LandedWindow:
    window: Window
    buffer: HostBuffer
    valid: int  # bytes of the buffer holding file data (short only at the end of the file)
    checked: bool = False  # ``check`` passed on these bytes
    check_seconds: float = 0.0  # what checking took (on the completing thread)


def stream_windows(
    windows: list[Window],
    open_file: Callable[[int], tuple[int, str]],
    engine: ReadEngine,
    pool: HostBufferPool,
    before_reuse: Callable[[HostBuffer], None] = lambda buffer: None,
    check: WindowCheck | None = None,
) -> Iterator[LandedWindow]:
    """Yield every window, in order, once read; up to ``pool.count`` reads in flight.

    ``open_file(i)`` gives the ``(fd, path)`` of ``window.file_index == i`` (called when its first
    read is submitted, so a checkpoint of many files keeps few open). A buffer is reused only
    after the caller has moved on from its window and ``before_reuse`` (e.g. waiting for
    asynchronous device copies out of it) has returned. If the caller stops early (an error),
    every read still in flight is waited for before the buffers go back: the kernel must not
    write into memory someone else owns. ``check`` runs on each complete window as its read
    completes (on the engine's thread); what it raises is raised to the caller in the
    window's turn, so every window before it is still delivered. A short window (the file
    shrank) is not checked: the caller names that itself.
    """
    pending: deque[_Pending] = deque()
    next_window = 0

    def submit(window: Window) -> None:
        buffer = pool.acquire()  # never blocks: at most pool.count reads are pending
        entry = _Pending(window, buffer, threading.Event())

        def on_done(error: BaseException | None, nbytes: int) -> None:
            wanted = window.end - window.start
            if error is None and check is not None and nbytes >= wanted:
                started = time.perf_counter()
                try:
                    entry.checked = check(window, buffer.view[:wanted])
                except BaseException as exc:  # noqa: BLE001 - raised to the caller in this window's turn
                    error = exc
                entry.check_seconds = time.perf_counter() - started
            entry.error, entry.nbytes = error, nbytes
            entry.done.set()

        fd, path = open_file(window.file_index)
        pending.append(entry)
        engine.submit(ReadRequest(fd, path, buffer.view[: window.read_bytes], window.start, on_done))

    try:
        while next_window < len(windows) or pending:
            while next_window < len(windows) and len(pending) < pool.count:
                submit(windows[next_window])
                next_window += 1
            entry = pending[0]
            entry.done.wait()
            if entry.error is not None:
                raise entry.error
            yield LandedWindow(entry.window, entry.buffer, min(entry.nbytes, entry.window.end - entry.window.start),
                               entry.checked, entry.check_seconds)
            pending.popleft()
            before_reuse(entry.buffer)
            pool.release(entry.buffer)
    finally:
        for entry in pending:
            entry.done.wait()
            with contextlib.suppress(Exception):
                before_reuse(entry.buffer)
            pool.release(entry.buffer)
