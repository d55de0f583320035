"""The save's worker threads: device copies counted, CUDA device and numba threads set per thread (issue 14.3, 14.5, 14.6).

CPU tests check what a CPU can show: the counters are 0 when nothing is on a GPU, the
sealer really runs checksums with numba capped to its share of cores (and the cap does
not leak into the training thread), and the save's workers are plain threads. The
``gpu`` tests assert that the asynchronous device-copy path is taken, on a copy stream
created once per device outside torch's stream pool, with the sealer on the tensors'
device.
"""

from __future__ import annotations

import threading

import numba
import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import small_config
from dcp_datastates import DataStatesReader, DataStatesWriter
from dcp_datastates import chunk_stream, snapshot


def roundtrip(path, state, engine="threads", use_async=False) -> DataStatesWriter:
    writer = DataStatesWriter(path, small_config(engine))
    if use_async:
        dcp.async_save(state, storage_writer=writer, no_dist=True).upload_completion.result(timeout=120)
    else:
        dcp.save(state, storage_writer=writer, no_dist=True)
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=DataStatesReader(path), no_dist=True)
    for k, v in state.items():
        assert torch.equal(out[k].cpu(), v.cpu()), k
    return writer


@pytest.mark.parametrize("use_async", [False, True], ids=["save", "async_save"])
def test_cpu_saves_count_no_device_copies(tmp_path, engine, use_async):
    writer = roundtrip(tmp_path / "c", {"a": torch.randn(30_000), "b": torch.arange(7)}, engine, use_async)
    stats = writer.last_stats
    assert stats is not None and stats.tensor_writes > 1  # the stream really wrote several buffers
    assert stats.device_copies == 0 and stats.copy_events == 0


def test_the_sealer_checksums_with_numba_capped_and_the_cap_stays_on_its_thread(tmp_path, monkeypatch):
    seen: list[tuple[str, int]] = []
    real = chunk_stream.block_checksums

    def spy(buffer, block_bytes):
        seen.append((threading.current_thread().name, numba.get_num_threads()))
        return real(buffer, block_bytes)

    monkeypatch.setattr(chunk_stream, "block_checksums", spy)
    monkeypatch.setattr(chunk_stream, "checksum_threads", lambda: 1)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    roundtrip(tmp_path / "c", {"a": torch.randn(30_000)})
    assert len(seen) > 1
    assert {name for name, _ in seen} == {"dcp-datastates-seal"}  # a plain thread of ours, not an executor's
    assert {threads for _, threads in seen} == {1}
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS  # the training thread keeps its own


@pytest.mark.parametrize(
    "cores, local_ranks, numba_max, expected",
    [(64, 1, 64, 4), (64, 8, 64, 4), (64, 32, 64, 1), (16, 8, 16, 1), (2, 1, 2, 1), (64, 1, 2, 2)],
)
def test_checksum_threads_take_a_small_share_of_this_ranks_cores(monkeypatch, cores, local_ranks, numba_max, expected):
    monkeypatch.setattr(chunk_stream.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", numba_max)
    assert chunk_stream.checksum_threads() == expected


def test_save_workers_are_plain_threads_that_end_with_the_save(tmp_path):
    before = {t.ident for t in threading.enumerate()}
    roundtrip(tmp_path / "c", {"a": torch.randn(30_000)}, use_async=True)
    leftover = [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("dcp-datastates")]
    assert leftover == []


# -- GPU --------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_device_copies_take_the_async_path_on_one_dedicated_stream(tmp_path):
    device = torch.cuda.device_count() - 1  # a non-default device where there is one
    previous = torch.cuda.current_device()
    torch.cuda.set_device(device)
    state = {"a": torch.randn(100_000, device=f"cuda:{device}"), "b": torch.arange(10_000, device=f"cuda:{device}")}
    sealer_devices: list[int] = []
    real_setup = chunk_stream._set_up_sealer_thread

    def spy(dev):
        real_setup(dev)
        sealer_devices.append(torch.cuda.current_device())

    chunk_stream._set_up_sealer_thread = spy
    try:
        first = roundtrip(tmp_path / "c1", state)
        second = roundtrip(tmp_path / "c2", state, use_async=True)
    finally:
        chunk_stream._set_up_sealer_thread = real_setup
        torch.cuda.set_device(previous)
    for writer in (first, second):
        stats = writer.last_stats
        total = sum(t.numel() * t.element_size() for t in state.values())
        assert stats.device_copies >= total // (8192 * 4)  # every buffer-sized piece went through the stream
        assert 1 <= stats.copy_events <= stats.tensor_writes  # one event per buffer holding device bytes
    assert sealer_devices == [device, device]  # each sealer thread set the tensors' device
    stream = snapshot.dedicated_copy_stream(device)
    assert snapshot.dedicated_copy_stream(device) is stream  # created once, reused by every save
    pool = {torch.cuda.Stream(device=device).cuda_stream for _ in range(64)}  # every stream of torch's pool
    assert stream.cuda_stream not in pool
