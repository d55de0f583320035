"""Stream a file's bytes through pool buffers into a write engine (the stage -> write step).

Records are appended in file order; the stream copies them into the current pool
buffer and hands each full buffer to the engine as one large aligned write, so a
rank's thousands of small tensors become a handful of ``chunk_bytes`` writes. The
last buffer is padded to the O_DIRECT alignment and the file is then truncated to
its exact length, so no garbage byte survives past the end.
"""

from __future__ import annotations

import os
import threading

import torch

from dcp_datastates.buffer_pool import HostBuffer, HostBufferPool
from dcp_datastates.config import DIRECT_IO_ALIGNMENT
from dcp_datastates.kernels import block_checksums
from dcp_datastates.native import OpenedFile, WriteEngine, WriteRequest


class ChunkedFileStream:
    """Append-only file writer over pool buffers.

    With ``checksum_block_bytes`` set (it must divide the pool's chunk size), every full
    buffer is checksummed block by block right before it is handed to the engine, while
    it is hot in cache: the checksums cost a few milliseconds per 32 MiB and never a
    second pass over the data.
    """

    def __init__(
        self,
        target: OpenedFile,
        engine: WriteEngine,
        pool: HostBufferPool,
        checksum_block_bytes: int | None = None,
        copy_stream: "torch.cuda.Stream | None" = None,
    ) -> None:
        if checksum_block_bytes is not None and pool.chunk_bytes % checksum_block_bytes:
            raise ValueError(f"checksum block {checksum_block_bytes} does not divide chunk {pool.chunk_bytes}")
        self._checksum_block_bytes = checksum_block_bytes
        self.checksums: list[int] = []
        self._copy_stream = copy_stream
        self._device_copies_pending = False  # device-to-host copies queued into the current buffer
        self._target = target
        self._engine = engine
        self._pool = pool
        self._buffer: HostBuffer | None = None
        self._fill = 0
        self._buffer_offset = 0  # file offset of the current buffer's first byte
        self._pending = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self.writes_submitted = 0

    @property
    def position(self) -> int:
        """File offset of the next byte appended."""
        return self._buffer_offset + self._fill

    def _current(self) -> HostBuffer:
        if self._buffer is None:
            self._raise_if_failed()
            self._buffer = self._pool.acquire()
        return self._buffer

    def write_bytes(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        pos = 0
        while pos < len(data):
            buffer = self._current()
            n = min(len(data) - pos, self._pool.chunk_bytes - self._fill)
            buffer.view[self._fill : self._fill + n] = data[pos : pos + n]
            self._advance(n)
            pos += n

    def write_tensor(self, flat_bytes: torch.Tensor) -> None:
        """Append a flat uint8 tensor; device tensors are copied asynchronously on the copy stream."""
        on_device = flat_bytes.device.type == "cuda" and self._copy_stream is not None
        if on_device:
            # The copy runs on another stream: keep the allocator from reusing this memory until it is done.
            flat_bytes.record_stream(self._copy_stream)
        total = flat_bytes.numel()
        pos = 0
        while pos < total:
            buffer = self._current()
            n = min(total - pos, self._pool.chunk_bytes - self._fill)
            if on_device:
                with torch.cuda.stream(self._copy_stream):
                    buffer.tensor[self._fill : self._fill + n].copy_(flat_bytes[pos : pos + n], non_blocking=True)
                self._device_copies_pending = True
            else:
                buffer.tensor[self._fill : self._fill + n].copy_(flat_bytes[pos : pos + n])
            self._advance(n)
            pos += n

    def finish_copies(self) -> None:
        """Wait until every byte appended so far has left its source (device copies included)."""
        if self._device_copies_pending and self._copy_stream is not None:
            self._copy_stream.synchronize()
            self._device_copies_pending = False

    def _advance(self, n: int) -> None:
        self._fill += n
        if self._fill == self._pool.chunk_bytes:
            self._submit(self._fill)

    def _submit(self, length: int) -> None:
        buffer = self._buffer
        assert buffer is not None
        self.finish_copies()  # the engine and the checksum must see the copied bytes
        if self._checksum_block_bytes is not None:
            self.checksums += block_checksums(buffer.view[: self._fill], self._checksum_block_bytes)
        offset = self._buffer_offset
        self._buffer = None
        self._buffer_offset += self._fill
        self._fill = 0
        with self._cond:
            self._pending += 1
        self.writes_submitted += 1

        def on_done(error: BaseException | None, buffer: HostBuffer = buffer) -> None:
            self._pool.release(buffer)
            with self._cond:
                self._pending -= 1
                if error is not None and self._error is None:
                    self._error = error
                self._cond.notify_all()

        try:
            self._engine.submit(WriteRequest(self._target.fd, self._target.path, buffer.view[:length], offset, on_done))
        except BaseException as exc:
            on_done(exc)
            raise

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _wait_all(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0)

    def close(self, fsync: bool) -> int:
        """Flush the tail, wait for every write, fix the length, fsync; return the file size."""
        size = self.position
        try:
            if self._fill:
                padded = -(-self._fill // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT
                self._submit(padded)
            self._wait_all()
            self._raise_if_failed()
            os.ftruncate(self._target.fd, size)
            if fsync:
                os.fsync(self._target.fd)
        finally:
            self.abort()
        return size

    def abort(self) -> None:
        """Wait for in-flight writes (their buffers must come back) and close the file."""
        if self._buffer is not None:
            self._pool.release(self._buffer)
            self._buffer = None
        self._wait_all()
        if not self._closed:
            self._closed = True
            os.close(self._target.fd)
