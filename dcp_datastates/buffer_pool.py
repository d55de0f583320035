"""A reusable pool of page-aligned (and, with CUDA, pinned) host staging buffers.

Allocating, faulting in and pinning host memory costs far more than copying into it (GBs of
fresh pages take seconds, and ``cudaHostRegister`` holds the CUDA driver's lock while it
pins), so the pool is allocated once per process, shared by every save, and *filled on a
background thread*: each chunk-sized buffer is mapped, faulted in and pinned there, one at a
time, and becomes available the moment it is ready. A save never allocates; the first one
waits only for the buffers it actually takes, and the training thread never faults or pins a
page. ``acquire`` blocks while every ready buffer is in flight, which is what bounds a save's
extra host memory to the pool size -- also when saves run back to back.

Sizes: an explicit ``host_pool_bytes`` is used as given (a larger state streams through the
pool chunk by chunk); ``"auto"`` sizes the pool to this rank's checkpoint bytes on first use,
capped by a safe share of the available host memory (``pool_sizing``), and grows it -- within
the same cap, one log line per growth -- if a later save's state is larger. A pool never shrinks.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import mmap
import threading
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from dcp_datastates.pool_sizing import HostMemory, buffers_for, host_memory, size_pool
from dcp_datastates.native.workers import start_without_interrupts

logger = logging.getLogger("dcp_datastates")

#: cudaHostRegisterPortable: pinned for every CUDA context of the process, not only the current device's.
_HOST_REGISTER_PORTABLE = 1


@dataclass(frozen=True)
class HostBuffer:
    """One chunk of the pool: the same memory as a torch tensor and as a memoryview."""

    index: int
    tensor: torch.Tensor  # uint8, length == chunk_bytes
    view: memoryview
    pinned: bool = False

    @property
    def address(self) -> int:
        """Address of the buffer's first byte."""
        return self.tensor.data_ptr()


#: madvise(2) advice that faults pages in writable without writing them (Linux >= 5.14).
_MADV_POPULATE_WRITE = 23
try:
    _libc: "ctypes.CDLL | None" = ctypes.CDLL(None, use_errno=True)
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
    _libc = None


def fault_in(address: int, length: int) -> None:
    """Fault in every page of ``[address, address + length)`` (page-aligned) so that no later copy faults.

    ``madvise(MADV_POPULATE_WRITE)`` has the kernel do it in one call; where the kernel is older,
    ``memset`` touches every page. Both run through ctypes, which releases the GIL, on one
    thread: the training thread's Python and torch's intra-op threads are left alone while a
    background thread fills the pool.
    """
    if _libc is not None and _libc.madvise(address, length, _MADV_POPULATE_WRITE) == 0:
        return
    ctypes.memset(address, 0, length)


#: Pools whose filler thread is running. The filler is a daemon thread (a process must never
#: wait for GBs of staging memory it will not use to exit), so it is stopped *before* the
#: interpreter finalizes: a daemon thread still inside a torch or C call then would be torn
#: down mid-call, which aborts the process ("terminate called without an active exception").
_filling: "weakref.WeakSet[HostBufferPool]" = weakref.WeakSet()


@atexit.register
def _stop_fillers_at_exit() -> None:
    for pool in list(_filling):
        pool.stop_filling()


class HostBufferPool:
    #: Pools allocated by this process (by tests and benchmarks to prove reuse).
    allocations: ClassVar[int] = 0
    _shared: ClassVar[dict[tuple[int, int, bool], "HostBufferPool"]] = {}
    _auto: ClassVar[dict[tuple[int, bool], "HostBufferPool"]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, chunk_bytes: int, count: int, pin: bool, device: int | None = None) -> None:
        """A pool of ``count`` buffers of ``chunk_bytes``, filled from now on by a background thread.

        ``pin``: register each buffer with CUDA (``device``: the device whose context registers
        them; ``None`` keeps the thread's default). The constructor returns at once.
        """
        if count < 1 or chunk_bytes < 1:
            raise ValueError(f"a pool needs at least one buffer of at least one byte, got {count} x {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.pin = pin
        self._device = device
        self._cond = threading.Condition()
        self._target = count
        self._buffers: list[HostBuffer] = []  # ready: mapped, faulted in and (if pinning works) pinned
        # Last released, first reused: a state smaller than the pool keeps cycling through the same
        # (cache- and TLB-warm) buffers.
        self._free: list[HostBuffer] = []
        self._filler: threading.Thread | None = None
        self._fill_error: BaseException | None = None
        self._pin_error: str | None = None
        self._in_use = 0
        self.peak_in_use = 0
        # auto pools: the memory they were sized against, and whether "cannot fit" was said already
        self._memory: HostMemory | None = None
        self._said_cannot_fit = False
        HostBufferPool.allocations += 1
        with self._cond:
            self._start_filling()

    # -- process-wide pools -------------------------------------------------------------------
    @classmethod
    def shared(cls, chunk_bytes: int, count: int, pin: bool, state_bytes: int | None = None) -> "HostBufferPool":
        """The process-wide pool of this explicit geometry, created (and starting to fill) on first use."""
        key = (chunk_bytes, count, pin)
        with cls._shared_lock:
            pool = cls._shared.get(key)
            if pool is None:
                pool = cls._shared[key] = cls(chunk_bytes, count, pin, _current_device(pin))
            if state_bytes is not None and state_bytes > pool.nbytes and not pool._said_cannot_fit:
                pool._said_cannot_fit = True
                logger.info(
                    "dcp_datastates: host_pool_bytes=%d holds %d of this rank's %d checkpoint bytes; the rest "
                    "streams through the pool at disk speed (host_pool_bytes='auto' sizes it to the state)",
                    pool.nbytes, pool.nbytes, state_bytes,
                )
        return pool

    @classmethod
    def auto(
        cls, chunk_bytes: int, pin: bool, state_bytes: int | None, memory: HostMemory | None = None
    ) -> "HostBufferPool":
        """The process-wide ``host_pool_bytes="auto"`` pool, sized (or grown) for ``state_bytes``.

        The first call sizes it -- to ``state_bytes`` rounded up to whole buffers, capped by
        ``pool_sizing.size_pool`` -- and logs one line saying the size and why; ``state_bytes``
        ``None`` (not known yet) gives a 512 MiB pool that the first save that knows grows.
        Later calls reuse it and grow it, in the background and within the same cap, if the
        state has grown; a state beyond the cap streams, said once. ``memory`` is for tests.
        """
        key = (chunk_bytes, pin)
        with cls._shared_lock:
            pool = cls._auto.get(key)
            if pool is None:
                memory = memory if memory is not None else host_memory()
                size = size_pool(state_bytes, chunk_bytes, memory)
                (logger.info if size.fits or state_bytes is None else logger.warning)(
                    "dcp_datastates: host staging pool (host_pool_bytes='auto') %s", size.reason
                )
                pool = cls._auto[key] = cls(chunk_bytes, size.buffers, pin, _current_device(pin))
                pool._memory = memory
                pool._said_cannot_fit = state_bytes is not None and not size.fits
            elif state_bytes is not None:
                pool._grow_for(state_bytes)
        return pool

    def _grow_for(self, state_bytes: int) -> None:
        assert self._memory is not None
        wanted = buffers_for(state_bytes, self.chunk_bytes)
        if wanted <= self.count:
            return
        size = size_pool(state_bytes, self.chunk_bytes, self._memory)  # the cap of the first sizing
        if size.buffers > self.count and self._fill_error is None:
            logger.info(
                "dcp_datastates: growing the host staging pool from %d to %d buffers for a state of %d bytes",
                self.count, size.buffers, state_bytes,
            )
            with self._cond:
                self._target = size.buffers
                self._start_filling()
        if not size.fits and not self._said_cannot_fit:
            self._said_cannot_fit = True
            logger.warning("dcp_datastates: host staging pool (host_pool_bytes='auto') %s", size.reason)

    # -- filling ------------------------------------------------------------------------------
    def _start_filling(self) -> None:
        """Start the filler thread unless it runs or nothing is missing (caller holds ``_cond``)."""
        if self._filler is None and len(self._buffers) < self._target:
            self._filler = threading.Thread(target=self._fill, name="dcp-datastates-pool-fill", daemon=True)
            start_without_interrupts(self._filler)

    def _fill(self) -> None:
        _filling.add(self)
        try:
            self._fill_buffers()
        finally:
            _filling.discard(self)

    def stop_filling(self) -> None:
        """Stop the filler after the buffer it is making (at exit), and wait for it."""
        with self._cond:
            self._target = min(self._target, len(self._buffers) + 1)
            filler = self._filler
        if filler is not None and filler is not threading.current_thread():
            filler.join()

    def _fill_buffers(self) -> None:
        try:
            if self.pin and self._device is not None:
                torch.cuda.set_device(self._device)  # register in the caller's context, not device 0's
        except Exception as exc:  # noqa: BLE001 - pinning is an optimisation; say so and go on unpinned
            self._pin_error = f"cannot select CUDA device {self._device}: {exc}"
            logger.warning("dcp_datastates: %s; staging buffers stay unpinned", self._pin_error)
        while True:
            with self._cond:
                if len(self._buffers) >= self._target:
                    self._filler = None
                    self._cond.notify_all()
                    return
                index = len(self._buffers)
            try:
                buffer = self._make_buffer(index)
            except BaseException as exc:  # noqa: BLE001 - reported to acquire() and the log
                logger.warning(
                    "dcp_datastates: could not allocate host staging buffer %d of %d bytes (%s); the pool keeps "
                    "its %d ready buffers", index, self.chunk_bytes, exc, index,
                )
                with self._cond:
                    self._fill_error = exc
                    self._target = len(self._buffers)  # make do with what is ready
                    self._filler = None
                    self._cond.notify_all()
                return
            with self._cond:
                self._buffers.append(buffer)
                self._free.append(buffer)
                self._cond.notify_all()

    def _make_buffer(self, index: int) -> HostBuffer:
        # Anonymous mmap memory is page-aligned, which O_DIRECT needs; torch's CPU allocator only
        # promises 64-byte alignment. One mapping per buffer, so the pool can grow buffer by buffer.
        memory = mmap.mmap(-1, self.chunk_bytes)
        tensor = torch.frombuffer(memory, dtype=torch.uint8)
        fault_in(tensor.data_ptr(), self.chunk_bytes)  # outside the CUDA driver's lock
        pinned = self.pin and self._pin_error is None and self._register(tensor.data_ptr())
        return HostBuffer(index, tensor, memoryview(memory), pinned)

    def _register(self, address: int) -> bool:
        """Pin one buffer; on failure say why once, clear CUDA's error state, and stop pinning."""
        try:
            status = torch.cuda.cudart().cudaHostRegister(address, self.chunk_bytes, _HOST_REGISTER_PORTABLE)
            if int(status) == 0:
                return True
            try:
                reason = f"{torch.cuda.cudart().cudaGetErrorString(status)} (error {int(status)})"
            except Exception:  # noqa: BLE001
                reason = f"error {int(status)}"
        except Exception as exc:  # noqa: BLE001 - no CUDA runtime, or no device: unpinned it is
            reason = str(exc)
        clear_cuda_error()
        self._pin_error = reason
        logger.warning(
            "dcp_datastates: cudaHostRegister of a %d-byte staging buffer failed: %s; this pool's buffers from "
            "here on stay unpinned (device-to-host copies into them are synchronous and slower)",
            self.chunk_bytes, reason,
        )
        return False

    # -- state ---------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Buffers this pool holds once filled."""
        return self._target

    @property
    def ready(self) -> int:
        """Buffers mapped, faulted in and pinned so far."""
        return len(self._buffers)

    @property
    def pinned(self) -> bool:
        """Pinning was asked for and has not failed (every ready buffer is pinned)."""
        return self.pin and self._pin_error is None and all(b.pinned for b in self._buffers)

    @property
    def pin_error(self) -> str | None:
        """Why pinning stopped, if it did."""
        return self._pin_error

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every buffer is ready (or filling gave up); True if it finished in time."""
        with self._cond:
            return self._cond.wait_for(lambda: self._filler is None, timeout)

    @property
    def in_use(self) -> int:
        """Buffers currently held by a save (0 when none is running: nothing leaks)."""
        return self._in_use

    @property
    def nbytes(self) -> int:
        return self.chunk_bytes * self.count

    def acquire(self) -> HostBuffer:
        """A free buffer; waits for one to be ready or for a write to finish when all are in flight."""
        with self._cond:
            while not self._free:
                if not self._buffers and self._filler is None and self._fill_error is not None:
                    raise RuntimeError(
                        f"no host staging buffer could be allocated ({self._fill_error}); free host memory or "
                        "lower host_pool_bytes / chunk_bytes"
                    ) from self._fill_error
                self._cond.wait()
            buffer = self._free.pop()
            self._in_use += 1
            self.peak_in_use = max(self.peak_in_use, self._in_use)
        return buffer

    def release(self, buffer: HostBuffer) -> None:
        with self._cond:
            self._in_use -= 1
            self._free.append(buffer)
            self._cond.notify()


def _current_device(pin: bool) -> int | None:
    """The calling thread's CUDA device, where CUDA is already initialised (never initialise it here)."""
    if pin and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return None


def clear_cuda_error() -> int | None:
    """Reset this thread's CUDA "last error" (``cudaGetLastError``); the code it held, or None.

    A failed runtime call leaves its error in the calling thread's last-error slot, where the
    next ``cudaGetLastError`` -- torch's check after a kernel launch -- would report it as
    that kernel's. torch's ``cudart()`` module binds no ``cudaGetLastError``; the process's
    libcudart (the one torch loaded) is called through ctypes instead.
    """
    bound = getattr(torch.cuda.cudart(), "cudaGetLastError", None) if torch.cuda.is_available() else None
    if bound is not None:
        return int(bound())
    library = _loaded_cudart()
    return int(library.cudaGetLastError()) if library is not None else None


def _loaded_cudart() -> "ctypes.CDLL | None":
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if "/libcudart.so" in path:
                    return ctypes.CDLL(path)  # already loaded: the same instance torch uses
    except OSError:
        pass
    return None
