"""Fallback engine: worker threads (``workers``) calling ``os.pwrite``, which releases the GIL."""

from __future__ import annotations

import os
from typing import ClassVar

from dcp_datastates.native.engine import MAX_RETRIES, TRANSIENT_ERRNOS, WriteEngine, WriteRequest
from dcp_datastates.native.workers import WorkerThreads


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
    """Each request runs on one of ``threads`` workers; at most ``2 * threads`` requests queue behind them."""

    name: ClassVar[str] = "threads"

    def __init__(self, threads: int) -> None:
        self._workers: WorkerThreads[WriteRequest] = WorkerThreads(threads, self._run, "dcp-datastates-pwrite")

    def _run(self, request: WriteRequest) -> None:
        error: BaseException | None = None
        try:
            write_fully(request.fd, request.path, request.buffer, request.offset)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through on_done
            error = exc
        request.on_done(error)

    def submit(self, request: WriteRequest) -> None:
        self._workers.submit(request)

    def close(self) -> None:
        self._workers.close()
