"""io_uring write engine: O_DIRECT writes on the shared ring (``uring_ring``), short writes finished."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from dcp_datastates.native.engine import MAX_RETRIES, TRANSIENT_ERRNOS, WriteEngine, WriteRequest
from dcp_datastates.native.uring_ring import InFlight, RingEngine


class IoUringWriteEngine(RingEngine, WriteEngine):
    name: ClassVar[str] = "io_uring"

    def __init__(self, queue_depth: int) -> None:
        super().__init__(queue_depth, "dcp-datastates-uring")

    def submit(self, request: WriteRequest) -> None:
        self._track(request)

    def _prepare(self, sqe: Any, entry: InFlight) -> None:
        view = entry.request.buffer[entry.done :]
        self._lib.io_uring_prep_write(sqe, entry.request.fd, view, len(view), entry.request.offset + entry.done)

    def _complete(self, user_data: int, result: int) -> None:
        entry = self._in_flight[user_data]
        request: WriteRequest = entry.request
        remaining = len(request.buffer) - entry.done
        error: BaseException | None = None
        if result < 0:
            errno_ = -result
            if errno_ in TRANSIENT_ERRNOS and entry.retries < MAX_RETRIES:
                entry.retries += 1
                self._resubmit(user_data)
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
                self._resubmit(user_data)
                return
        self._finished(user_data)
        request.on_done(error)
