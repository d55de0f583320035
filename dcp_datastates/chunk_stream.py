"""Stream a file's bytes through pool buffers into a write engine (the stage -> write step).

Records are appended in file order; the stream copies them into the current pool
buffer and, once the buffer is full, *seals* it: a sealer thread waits for the
buffer's copies (a CUDA event per buffer when they come from the GPU), checksums it
and hands it to the engine as one large aligned write. Copying therefore never waits
for checksums or the disk -- only for a free buffer -- so the live state is released
(``finish_copies``) as fast as the copies run, and the disk starts on the first
buffer while later ones are still being copied. A rank's thousands of small tensors
become a handful of ``chunk_bytes`` writes. The last buffer is padded to the O_DIRECT
alignment and the file is then truncated to its exact length, so no garbage byte
survives past the end.

The sealer is a plain thread fed through a queue -- never a ``concurrent.futures``
executor, which refuses work once the interpreter has begun to exit and would leave a
save that a returning script must finish waiting forever (see ``shutdown``). A buffer
is counted as pending only once it is queued, so every count has a worker behind it.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

import torch

from dcp_datastates.buffer_pool import HostBuffer, HostBufferPool
from dcp_datastates.config import DIRECT_IO_ALIGNMENT
from dcp_datastates.dir_files import check_still_linked
from dcp_datastates.kernels import block_checksums
from dcp_datastates.native import OpenedFile, WriteEngine, WriteRequest
from dcp_datastates.shutdown import check_not_abandoned, install_exit_hook


@dataclass
class _Sealed:
    """A full (or final) buffer on its way to the disk."""

    buffer: HostBuffer
    used: int  # bytes of data in it
    length: int  # bytes to write (``used`` rounded up to the O_DIRECT alignment for the tail)
    offset: int  # file offset of its first byte
    copied: "torch.cuda.Event | None"  # recorded after its device copies, if any


def checksum_threads() -> int:
    """numba threads one sealer may use for checksums: a small share of this rank's cores.

    numba's default is every core, and every rank of a node has its own sealer: 8 ranks x
    all cores of parallel hashing would starve the data loaders and NCCL's threads. One
    core hashes XXH64 at several GB/s -- above what one rank's share of the disk takes.
    """
    import numba

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(4, cores // (2 * local_ranks), numba.config.NUMBA_NUM_THREADS))


def _set_up_sealer_thread(device: "torch.device | None") -> None:
    """Per-thread state of a sealer: its CUDA device, and numba's thread cap.

    Both are thread-local. Without ``set_device`` a fresh thread's first CUDA call
    (``Event.synchronize``) creates a context on GPU 0: seven stray contexts on an
    8-GPU node.
    """
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    import numba

    numba.set_num_threads(checksum_threads())


class ChunkedFileStream:
    """Append-only file writer over pool buffers.

    With ``checksum_block_bytes`` set (it must divide the pool's chunk size), every full
    buffer is checksummed block by block by the sealer right before it goes to the
    engine, while it is hot in cache: never a second pass over the data, and never on
    the copying thread's path.

    With ``copy_stream`` set, tensors on that stream's CUDA device are copied
    asynchronously on it into the (pinned) pool buffers.
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
        self._device_copies_pending = False  # device-to-host copies queued and not yet waited for
        self._buffer_has_device_copies = False  # ... some of them into the current buffer
        self._target = target
        self._engine = engine
        self._pool = pool
        self._buffer: HostBuffer | None = None
        self._fill = 0
        self._buffer_offset = 0  # file offset of the current buffer's first byte
        # One thread, so buffers are checksummed and submitted in file order. Started on the
        # first seal; a plain thread and queue (see the module docstring for why).
        self._queue: queue.SimpleQueue[_Sealed | None] = queue.SimpleQueue()
        self._sealer: threading.Thread | None = None
        self._sealer_stopped = False
        self._pending = 0  # sealed buffers queued and not yet written (or failed)
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self.writes_submitted = 0
        self.device_copies = 0  # asynchronous device-to-host copies queued on the copy stream
        self.copy_events = 0  # per-buffer CUDA events recorded after them
        install_exit_hook()

    @property
    def position(self) -> int:
        """File offset of the next byte appended."""
        return self._buffer_offset + self._fill

    def _current(self) -> HostBuffer:
        if self._buffer is None:
            self._raise_if_failed()
            check_not_abandoned()
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
        """Append a flat uint8 tensor; tensors on the copy stream's device are copied asynchronously."""
        stream = self._copy_stream
        on_stream = stream is not None and flat_bytes.device == stream.device
        if on_stream:
            # The copy runs on another stream: keep the allocator from reusing this memory until it is done.
            flat_bytes.record_stream(stream)
        total = flat_bytes.numel()
        pos = 0
        while pos < total:
            buffer = self._current()
            n = min(total - pos, self._pool.chunk_bytes - self._fill)
            if on_stream:
                with torch.cuda.stream(stream):
                    buffer.tensor[self._fill : self._fill + n].copy_(flat_bytes[pos : pos + n], non_blocking=True)
                self._device_copies_pending = self._buffer_has_device_copies = True
                self.device_copies += 1
            else:  # host memory, or a GPU other than the stream's: a synchronous copy
                buffer.tensor[self._fill : self._fill + n].copy_(flat_bytes[pos : pos + n])
            self._advance(n)
            pos += n

    def finish_copies(self) -> None:
        """Wait until every byte appended so far has left its source (device copies included).

        Checksums and disk writes may still be running: they read the pool, not the live state.
        """
        if self._device_copies_pending and self._copy_stream is not None:
            # A blocking-sync event rather than stream.synchronize(): the wait sleeps instead of
            # spinning a core (the device's default schedule may spin).
            done = torch.cuda.Event(blocking=True)
            done.record(self._copy_stream)
            done.synchronize()
            self._device_copies_pending = False

    def _advance(self, n: int) -> None:
        self._fill += n
        if self._fill == self._pool.chunk_bytes:
            self._seal(self._fill)

    def _seal(self, length: int) -> None:
        """Hand the current buffer to the sealer: wait for its copies, checksum, submit ``length`` bytes."""
        buffer, used, offset = self._buffer, self._fill, self._buffer_offset
        assert buffer is not None
        copied: torch.cuda.Event | None = None
        if self._buffer_has_device_copies:
            assert self._copy_stream is not None
            copied = torch.cuda.Event(blocking=True)  # the sealer sleeps on it, never spins
            copied.record(self._copy_stream)
            self.copy_events += 1
            self._buffer_has_device_copies = False
        if self._sealer_stopped:
            raise RuntimeError(f"{self._target.path}: stream already closed")
        self._start_sealer()  # may raise: then nothing was counted and the buffer is still ours
        self._buffer = None
        self._buffer_offset += used
        self._fill = 0
        with self._cond:
            self._pending += 1
        self._queue.put(_Sealed(buffer, used, length, offset, copied))

    def _start_sealer(self) -> None:
        if self._sealer is not None:
            return
        device = self._copy_stream.device if self._copy_stream is not None else None
        sealer = threading.Thread(target=self._seal_forever, args=(device,), name="dcp-datastates-seal", daemon=True)
        sealer.start()
        self._sealer = sealer

    def _seal_forever(self, device: "torch.device | None") -> None:
        try:
            _set_up_sealer_thread(device)
        except BaseException as exc:  # noqa: BLE001 - reported like a failed write
            self._fail(exc)
        while True:
            sealed = self._queue.get()
            if sealed is None:
                return
            self._checksum_and_submit(sealed)

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error

    def _checksum_and_submit(self, sealed: _Sealed) -> None:
        buffer = sealed.buffer

        def on_done(error: BaseException | None) -> None:
            self._pool.release(buffer)
            with self._cond:
                self._pending -= 1
                if error is not None and self._error is None:
                    self._error = error
                self._cond.notify_all()

        try:
            if sealed.copied is not None:
                # The engine and the checksum must see the copied bytes -- and the buffer may not go
                # back to the pool, even after a failure, while a copy into it is still in flight.
                sealed.copied.synchronize()
            if self._error is not None:  # an earlier write failed: the file is lost anyway
                raise self._error
            check_not_abandoned()
            if self._checksum_block_bytes is not None:
                self.checksums += block_checksums(buffer.view[: sealed.used], self._checksum_block_bytes)
            request = WriteRequest(self._target.fd, self._target.path, buffer.view[: sealed.length], sealed.offset, on_done)
            self._engine.submit(request)
            self.writes_submitted += 1
        except BaseException as exc:  # noqa: BLE001 - reported by close() / the next append
            on_done(exc)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _wait_all(self) -> None:
        """Stop the sealer after the buffers queued so far, and wait until each is written or failed."""
        if self._sealer is not None and not self._sealer_stopped:
            self._sealer_stopped = True
            self._queue.put(None)
            self._sealer.join()
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0)

    def close(self, fsync: bool) -> int:
        """Flush the tail, wait for every write, fix the length, fsync; return the file size."""
        size = self.position
        try:
            if self._fill:
                self._seal(-(-self._fill // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT)
            self._wait_all()
            self._raise_if_failed()
            os.ftruncate(self._target.fd, size)
            if fsync:
                os.fsync(self._target.fd)
            target = self._target
            if target.dir_fd is None:
                check_still_linked(target.fd, target.path)
            else:  # created relative to the checkpoint directory's descriptor: checked against that directory
                check_still_linked(target.fd, os.path.basename(target.path), target.dir_fd, target.path)
        finally:
            self.abort()
        return size

    def abort(self) -> None:
        """Wait for in-flight copies and writes (their buffers must come back) and close the file."""
        if self._buffer is not None:
            self.finish_copies()  # a queued copy into this buffer must land before it is reused
            self._pool.release(self._buffer)
            self._buffer = None
        self._wait_all()
        if not self._closed:
            self._closed = True
            os.close(self._target.fd)
