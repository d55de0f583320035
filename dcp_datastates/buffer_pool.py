"""A reusable pool of page-aligned (and, with CUDA, pinned) host staging buffers.

Allocating and pinning host memory costs far more than copying into it, so the pool
is allocated once per process and shared by every save: a state larger than the pool
streams through it, chunk by chunk, instead of growing host memory. ``acquire``
blocks while every buffer is in flight, which is what bounds a save's extra host
memory to the pool size -- also when saves run back to back.
"""

from __future__ import annotations

import mmap
import queue
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch

#: cudaHostRegisterPortable: pinned for every CUDA context of the process, not only the current device's.
_HOST_REGISTER_PORTABLE = 1


@dataclass(frozen=True)
class HostBuffer:
    """One chunk of the pool: the same memory as a torch tensor and as a memoryview."""

    index: int
    tensor: torch.Tensor  # uint8, length == chunk_bytes
    view: memoryview


class HostBufferPool:
    #: Pools allocated by this process (by tests and benchmarks to prove reuse).
    allocations: ClassVar[int] = 0
    _shared: ClassVar[dict[tuple[int, int, bool], "HostBufferPool"]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, chunk_bytes: int, count: int, pin: bool) -> None:
        # Anonymous mmap memory is page-aligned, which O_DIRECT needs; torch's CPU
        # allocator only promises 64-byte alignment. Pages are faulted in by the first copies
        # into them (on the snapshot thread, not the caller's); pinning faults them in at once.
        self._memory = mmap.mmap(-1, chunk_bytes * count)
        whole = torch.frombuffer(self._memory, dtype=torch.uint8)
        self.pinned = False
        if pin:
            status = torch.cuda.cudart().cudaHostRegister(whole.data_ptr(), whole.numel(), _HOST_REGISTER_PORTABLE)
            self.pinned = int(status) == 0
        self.chunk_bytes = chunk_bytes
        self.count = count
        whole_view = memoryview(self._memory)
        self._buffers = [
            HostBuffer(i, whole[i * chunk_bytes : (i + 1) * chunk_bytes], whole_view[i * chunk_bytes : (i + 1) * chunk_bytes])
            for i in range(count)
        ]
        # Last released, first reused: a state smaller than the pool keeps cycling through the same
        # (cache- and TLB-warm) buffers.
        self._free: queue.LifoQueue[HostBuffer] = queue.LifoQueue()
        for buffer in self._buffers:
            self._free.put(buffer)
        self._lock = threading.Lock()
        self._in_use = 0
        self.peak_in_use = 0
        HostBufferPool.allocations += 1

    @classmethod
    def shared(cls, chunk_bytes: int, count: int, pin: bool) -> "HostBufferPool":
        """The process-wide pool of this geometry, created on first use."""
        key = (chunk_bytes, count, pin)
        with cls._shared_lock:
            pool = cls._shared.get(key)
            if pool is None:
                pool = cls._shared[key] = cls(chunk_bytes, count, pin)
            return pool

    @property
    def in_use(self) -> int:
        """Buffers currently held by a save (0 when none is running: nothing leaks)."""
        return self._in_use

    @property
    def nbytes(self) -> int:
        return self.chunk_bytes * self.count

    def acquire(self) -> HostBuffer:
        """A free buffer; waits for a write to finish when all are in flight."""
        buffer = self._free.get()
        with self._lock:
            self._in_use += 1
            self.peak_in_use = max(self.peak_in_use, self._in_use)
        return buffer

    def release(self, buffer: HostBuffer) -> None:
        with self._lock:
            self._in_use -= 1
        self._free.put(buffer)
