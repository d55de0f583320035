"""Fallback engine: a pool of threads calling ``os.pwrite`` (which releases the GIL).

Plain threads fed by a queue, not a ``concurrent.futures`` executor: an executor refuses
new work once the interpreter has begun to exit, and a save still in flight when a
script returns must be able to finish (the interpreter waits for it).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import ClassVar

from dcp_datastates.native.engine import MAX_RETRIES, TRANSIENT_ERRNOS, WriteEngine, WriteRequest


def write_fully(fd: int, path: str, buffer: memoryview, offset: int) -> None:
    """pwrite until every byte is written; retry transient errors; name the file on failure."""
    done, retries = 0, 0
    while done < len(buffer):
        try:
            written = os.pwrite(fd, buffer[done:], offset + done)
        except OSError as exc:
            if exc.errno in TRANSIENT_ERRNOS and retries < MAX_RETRIES:
                retries += 1
                continue
            raise OSError(exc.errno, f"{exc.strerror} (writing {path} at offset {offset + done})", path) from exc
        if written == 0:
            raise OSError(28, f"No space left on device? pwrite wrote 0 bytes to {path} at offset {offset + done}", path)
        done += written


class ThreadPoolWriteEngine(WriteEngine):
    """Each request runs on one of ``threads`` workers; at most ``threads`` requests queue behind them."""

    name: ClassVar[str] = "threads"

    def __init__(self, threads: int) -> None:
        self._queue: queue.SimpleQueue[WriteRequest | None] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(2 * threads)
        self._closed = False
        self._workers: list[threading.Thread] = []
        try:
            for i in range(threads):
                worker = threading.Thread(target=self._work, name=f"dcp-datastates-pwrite-{i}", daemon=True)
                worker.start()
                self._workers.append(worker)
        except BaseException:
            self.close()
            raise

    def _work(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            self._run(request)

    def _run(self, request: WriteRequest) -> None:
        error: BaseException | None = None
        try:
            write_fully(request.fd, request.path, request.buffer, request.offset)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through on_done
            error = exc
        finally:
            self._slots.release()
        request.on_done(error)

    def submit(self, request: WriteRequest) -> None:
        if self._closed:
            raise RuntimeError("pwrite engine is closed")
        self._slots.acquire()
        self._queue.put(request)  # cannot fail: a worker is behind every queued request

    def close(self) -> None:
        """Let the workers drain the queue, then stop them."""
        if self._closed:
            return
        self._closed = True
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join()
