"""The host staging pool: ``host_pool_bytes="auto"`` sizing, and filling off the caller's thread.

Sizing is shown with fake host memory (``HostMemory``), so the cap and the "cannot fit" path
run on any machine. Filling off the caller's thread is shown by construction: ``fault_in`` --
the one place pages are touched -- records which thread called it and can be held, so a save
provably stages through the ready buffers while the rest of the pool is still being faulted in.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter
from dcp_datastates import buffer_pool
from dcp_datastates.buffer_pool import HostBufferPool
from dcp_datastates.pool_sizing import HostMemory, UNKNOWN_STATE_BYTES, host_memory, size_pool

MiB = 1024**2
GiB = 1024**3
FILLER = "dcp-datastates-pool-fill"


@pytest.fixture(autouse=True)
def fresh_pools(monkeypatch):
    """Each test gets its own process-wide pool registries (restored afterwards)."""
    shared: dict = {}
    auto: dict = {}
    monkeypatch.setattr(HostBufferPool, "_shared", shared)
    monkeypatch.setattr(HostBufferPool, "_auto", auto)
    yield
    # no filler of this test runs into the next one (the reader's load pools fill in the background too)
    for pool in [*shared.values(), *auto.values(), *list(buffer_pool._filling)]:
        assert pool.wait_ready(60)


@pytest.fixture
def pool_log(caplog):
    caplog.set_level(logging.INFO, logger="dcp_datastates")
    return lambda: [r for r in caplog.records if "pool" in r.getMessage()]


def resident_pages(address: int, length: int) -> int:
    """Pages of ``[address, address + length)`` in RAM now (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-length // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec)


class FaultRecorder:
    """Wraps ``fault_in``: records the calling thread, lets the first ``allow`` calls through, holds the rest."""

    def __init__(self, allow: int | None = None) -> None:
        self.threads: list[str] = []
        self.allow = allow
        self.release = threading.Event()
        self.held = threading.Event()
        self._real = buffer_pool.fault_in

    def __call__(self, address: int, length: int) -> None:
        self.threads.append(threading.current_thread().name)
        if self.allow is not None and len(self.threads) > self.allow:
            self.held.set()
            assert self.release.wait(60), "test never released the filler"
        self._real(address, length)


# -- sizing ----------------------------------------------------------------------------------------
def test_auto_size_holds_the_state_rounded_up_to_whole_chunks():
    memory = HostMemory(available_bytes=64 * GiB, local_ranks=1, source="MemAvailable")
    size = size_pool(10 * MiB + 5, MiB, memory)
    assert size.buffers == 11 and size.fits
    assert "holds this rank's 10.0 MiB" in size.reason and "11 buffers" in size.reason
    assert size_pool(100, 32 * MiB, memory).buffers == 2  # never fewer than two: copying overlaps writing


def test_auto_size_is_capped_by_a_safe_share_of_available_memory_per_local_rank():
    # 8 GiB available, 4 ranks on the node: each may take half of it split four ways = 1 GiB.
    memory = HostMemory(available_bytes=8 * GiB, local_ranks=4, source="MemAvailable")
    size = size_pool(3 * GiB, 32 * MiB, memory)
    assert size.buffers == 32 and size.nbytes(32 * MiB) == GiB and not size.fits
    assert "cannot fit" in size.reason and "host_pool_bytes" in size.reason and "4 local rank(s)" in size.reason
    alone = size_pool(3 * GiB, 32 * MiB, HostMemory(8 * GiB, 1, "MemAvailable"))
    assert alone.buffers == 96 and alone.fits  # the same state fits on a node with one rank


def test_unknown_state_gets_the_old_default_within_the_cap():
    assert size_pool(None, 32 * MiB, HostMemory(64 * GiB, 1, "x")).nbytes(32 * MiB) == UNKNOWN_STATE_BYTES
    assert size_pool(None, 32 * MiB, HostMemory(GiB, 2, "x")).nbytes(32 * MiB) == 8 * 32 * MiB


def test_host_memory_reads_meminfo_the_cgroup_limit_and_local_world_size(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemFree:  1 kB\nMemAvailable:   104857600 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    memory = host_memory(meminfo, cgroup)  # no cgroup files: the host's figure
    assert (memory.available_bytes, memory.local_ranks, memory.source) == (100 * GiB, 8, "MemAvailable")
    assert memory.share_bytes == 100 * GiB // 2 // 8
    (cgroup / "memory.max").write_text("max\n")
    assert host_memory(meminfo, cgroup).available_bytes == 100 * GiB  # unlimited cgroup
    (cgroup / "memory.max").write_text(f"{40 * GiB}\n")
    (cgroup / "memory.current").write_text(f"{10 * GiB}\n")
    tight = host_memory(meminfo, cgroup)
    assert tight.available_bytes == 30 * GiB and "cgroup" in tight.source
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not-a-number")
    fallback = host_memory(tmp_path / "missing", tmp_path / "missing")
    assert fallback.local_ranks == 1 and fallback.source == "free pages" and fallback.available_bytes > 0


def test_auto_pool_logs_one_line_then_grows_then_says_once_that_the_state_cannot_fit(pool_log):
    memory = HostMemory(available_bytes=64 * MiB, local_ranks=1, source="MemAvailable")  # cap: 32 MiB
    chunk = MiB
    pool = HostBufferPool.auto(chunk, False, 4 * MiB, memory)
    assert pool.count == 4 and pool.nbytes == 4 * MiB
    assert [r.getMessage() for r in pool_log()] == [
        "dcp_datastates: host staging pool (host_pool_bytes='auto') 4.0 MiB: holds this rank's 4.0 MiB of "
        "checkpoint bytes whole, in 4 buffers of 1.0 MiB (32.0 MiB cap = 50% of 64.0 MiB available "
        "(MemAvailable) / 1 local rank(s))"
    ]
    assert HostBufferPool.auto(chunk, False, 3 * MiB, memory) is pool and len(pool_log()) == 1  # reused, silent
    assert HostBufferPool.auto(chunk, False, 10 * MiB, memory) is pool  # the state grew: the pool grows
    assert pool.count == 10 and len(pool_log()) == 2 and "from 4 to 10 buffers" in pool_log()[1].getMessage()
    assert pool.wait_ready(30) and pool.ready == 10
    for _ in range(3):  # beyond the cap: grow to the cap, and say once that the rest streams
        assert HostBufferPool.auto(chunk, False, 100 * MiB, memory) is pool
    assert pool.count == 32
    cannot = [r for r in pool_log() if "cannot fit" in r.getMessage()]
    assert len(cannot) == 1 and cannot[0].levelno == logging.WARNING
    assert pool.wait_ready(30) and pool.ready == 32 and HostBufferPool.allocations >= 1


def test_state_that_cannot_fit_at_first_use_is_said_once_as_a_warning(pool_log):
    memory = HostMemory(available_bytes=16 * MiB, local_ranks=2, source="MemAvailable")  # cap: 4 MiB
    pool = HostBufferPool.auto(MiB, False, 64 * MiB, memory)
    HostBufferPool.auto(MiB, False, 64 * MiB, memory)
    assert pool.count == 4
    (line,) = pool_log()
    assert line.levelno == logging.WARNING and "cannot fit" in line.getMessage() and "2 local rank(s)" in line.getMessage()


def test_writer_pool_is_auto_by_default_and_an_explicit_size_wins(tmp_path, monkeypatch, pool_log):
    monkeypatch.setattr(buffer_pool, "host_memory", lambda: HostMemory(GiB, 1, "MemAvailable"))
    auto = DataStatesWriter(tmp_path / "a", DataStatesConfig(chunk_bytes="1MiB"))
    assert auto.config.host_pool_bytes == "auto"
    pool = auto._pool(5 * MiB + 1)
    assert pool.count == 6 and auto._pool(5 * MiB) is pool  # process-wide, reused
    explicit = DataStatesWriter(tmp_path / "b", DataStatesConfig(chunk_bytes="1MiB", host_pool_bytes="3MiB"))
    small = explicit._pool(100 * MiB)
    assert small.count == 3 and small is not pool
    assert any("streams through the pool" in r.getMessage() for r in pool_log())


# -- filling off the caller's thread ---------------------------------------------------------------
@pytest.mark.parametrize("how", ["madvise", "memset"])  # memset: kernels older than 5.14
def test_the_pool_is_faulted_in_by_its_own_thread_never_the_callers(monkeypatch, how):
    if how == "memset":
        monkeypatch.setattr(buffer_pool, "_libc", None)
    recorder = FaultRecorder()
    monkeypatch.setattr(buffer_pool, "fault_in", recorder)
    control = mmap.mmap(-1, 16 * mmap.PAGESIZE)  # the residency check can fail: fresh pages are not in RAM
    assert resident_pages(ctypes.addressof(ctypes.c_char.from_buffer(control)), len(control)) == 0
    pool = HostBufferPool.shared(64 * 1024, 8, False)
    assert pool.wait_ready(30) and pool.ready == 8
    assert recorder.threads == [FILLER] * 8 and threading.current_thread().name != FILLER
    for buffer in pool._buffers:  # every page of every buffer is resident before any save touches it
        assert resident_pages(buffer.tensor.data_ptr(), pool.chunk_bytes) == pool.chunk_bytes // mmap.PAGESIZE


def test_creating_the_pool_returns_before_any_buffer_is_ready(monkeypatch):
    recorder = FaultRecorder(allow=0)
    monkeypatch.setattr(buffer_pool, "fault_in", recorder)
    pool = HostBufferPool.shared(8192, 4, False)
    assert recorder.held.wait(30) and pool.ready == 0 and not pool.wait_ready(0.05)
    recorder.release.set()
    assert pool.wait_ready(30) and pool.ready == 4


@pytest.mark.parametrize("engine", ["threads", "io_uring"])
def test_first_save_stages_through_the_ready_buffers_while_the_rest_are_still_being_faulted(tmp_path, monkeypatch, engine):
    recorder = FaultRecorder(allow=2)  # two buffers ready, the third held in fault_in
    monkeypatch.setattr(buffer_pool, "fault_in", recorder)
    config = DataStatesConfig(io_engine=engine, chunk_bytes=8192, host_pool_bytes=16 * 8192)
    state = {"w": torch.randn(50_000), "b": torch.arange(1000, dtype=torch.int64), "step": 7}  # ~25 buffers' worth
    response = dcp.async_save(state, storage_writer=DataStatesWriter(tmp_path / "c", config), no_dist=True)
    response.staging_completion.result(timeout=60)
    response.upload_completion.result(timeout=60)
    pool = HostBufferPool.shared(8192, 16, torch.cuda.is_available())
    assert recorder.held.is_set() and pool.ready == 2 and pool.count == 16  # the save never waited for the rest
    assert pool.peak_in_use <= 2 and pool.in_use == 0
    assert set(recorder.threads) == {FILLER}
    recorder.release.set()
    assert pool.wait_ready(30) and pool.ready == 16
    out = {"w": torch.zeros(50_000), "b": torch.zeros(1000, dtype=torch.int64), "step": 0}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"]) and out["step"] == 7


def test_auto_pool_save_round_trips_within_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(buffer_pool, "host_memory", lambda: HostMemory(2 * MiB, 1, "MemAvailable"))  # cap: 16 x 64 KiB
    state = {"w": torch.randn(2**19), "step": 3}  # 2 MiB: more than the cap, so it streams
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c", DataStatesConfig(chunk_bytes="64KiB")), no_dist=True)
    (pool,) = HostBufferPool._auto.values()
    assert pool.count == 16 and pool.in_use == 0
    out = {"w": torch.zeros(2**19), "step": 0}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert torch.equal(out["w"], state["w"]) and out["step"] == 3


# -- failures ------------------------------------------------------------------------------------
class FakeCudart:
    """cudaHostRegister that fails with cudaErrorMemoryAllocation, as on a host out of lockable memory."""

    def __init__(self, status: int = 2) -> None:
        self.status = status
        self.registered = 0
        self.cleared = 0

    def cudaHostRegister(self, address: int, length: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        self.registered += 1
        return self.status

    def cudaGetErrorString(self, status: int) -> str:  # noqa: N802
        return "out of memory"

    def cudaGetLastError(self) -> int:  # noqa: N802
        self.cleared += 1
        return 2


def test_failed_pinning_is_logged_once_clears_the_cuda_error_and_falls_back_unpinned(tmp_path, monkeypatch, pool_log):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # no device to select: none is touched
    pool = HostBufferPool.shared(8192, 4, True)
    assert pool.wait_ready(30) and pool.ready == 4
    assert fake.registered == 1 and fake.cleared == 1  # tried once, error state cleared, then no more tries
    assert not pool.pinned and pool.pin_error == "out of memory (error 2)"
    assert not any(b.pinned for b in pool._buffers)
    (line,) = pool_log()
    assert line.levelno == logging.WARNING and "cudaHostRegister" in line.getMessage() and "unpinned" in line.getMessage()
    buffer = pool.acquire()  # and the pool still stages
    buffer.tensor.fill_(7)
    assert bytes(buffer.view[:3]) == b"\x07\x07\x07"
    pool.release(buffer)


def test_the_filler_selects_the_callers_gpu_before_it_pins(monkeypatch):
    """Registration happens in the caller's device context (not device 0's), on the filler thread."""
    fake = FakeCudart(status=0)
    selected: list[tuple[str, int]] = []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # the caller trains on GPU 3
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: selected.append((threading.current_thread().name, d)))
    pool = HostBufferPool.shared(8192, 3, True)
    assert pool.wait_ready(30) and pool.ready == 3
    assert selected == [(FILLER, 3)] and fake.registered == 3 and fake.cleared == 0
    assert pool.pinned and all(b.pinned for b in pool._buffers)


def test_pinning_without_a_cuda_runtime_falls_back_visibly(pool_log):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: pinning works here")
    pool = HostBufferPool.shared(8192, 2, True)
    assert pool.wait_ready(30) and pool.ready == 2 and not pool.pinned and pool.pin_error
    assert len([r for r in pool_log() if "cudaHostRegister" in r.getMessage()]) == 1


def test_a_buffer_that_cannot_be_mapped_leaves_the_pool_with_what_is_ready(monkeypatch, pool_log):
    real = mmap.mmap
    made = {"n": 0}

    def third_fails(*args, **kwargs):
        made["n"] += 1
        if made["n"] > 2:
            raise OSError(12, "Cannot allocate memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(buffer_pool.mmap, "mmap", third_fails)
    pool = HostBufferPool.shared(8192, 8, False)
    assert pool.wait_ready(30) and pool.ready == 2 and pool.count == 2
    assert any("could not allocate" in r.getMessage() for r in pool_log())
    a, b = pool.acquire(), pool.acquire()
    pool.release(a)
    pool.release(b)
    assert pool.in_use == 0


def test_a_pool_that_cannot_map_any_buffer_fails_acquire_with_an_actionable_error(monkeypatch):
    def never(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(buffer_pool.mmap, "mmap", never)
    pool = HostBufferPool.shared(8192, 4, False)
    assert pool.wait_ready(30) and pool.ready == 0
    with pytest.raises(RuntimeError, match="no host staging buffer could be allocated.*host_pool_bytes"):
        pool.acquire()
