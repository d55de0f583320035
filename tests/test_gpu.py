"""The CUDA paths of the lazy snapshot: pinned pool, side-stream copies, ordering with training.

Marked ``gpu``: skipped without a CUDA device; on a GPU machine ``python -m pytest -m gpu`` runs
them with the CUDA cases of the lazy-snapshot tests (CONTRIBUTING.md: ``.ci/gpu``).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import assert_state_equal, sample_state, small_config, zeros_like_state
from dcp_datastates import DataStatesReader, DataStatesWriter
from dcp_datastates.buffer_pool import HostBufferPool

pytestmark = pytest.mark.gpu


def to_device(state: dict, device: str) -> dict:
    """The same state with every tensor on ``device`` (strides kept: non-contiguous stays so)."""
    return {
        k: v.to(device) if isinstance(v, torch.Tensor) else to_device(v, device) if isinstance(v, dict) else v
        for k, v in state.items()
    }


def busy_gpu(seconds: float) -> None:
    """Queue ``seconds`` of GPU work on the current stream (it returns at once)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    cycles_per_second = 1_000_000 / (start.elapsed_time(end) / 1000)
    torch.cuda._sleep(int(cycles_per_second * seconds))


def test_gpu_state_round_trips_exactly_and_stock_reads_it(tmp_path, engine):
    state = to_device(sample_state(), "cuda")
    writer = DataStatesWriter(tmp_path / "c", small_config(engine))  # 8 KiB buffers: many device copies
    dcp.save(state, storage_writer=writer, no_dist=True)
    ours = zeros_like_state(state)
    dcp.load(ours, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert_state_equal(ours, state)
    host = to_device(state, "cpu")
    stock = zeros_like_state(host)
    dcp.load(stock, storage_reader=dcp.FileSystemReader(tmp_path / "c"), no_dist=True)
    assert_state_equal(stock, host)


def test_the_pool_is_pinned_so_device_copies_run_asynchronously():
    pool = HostBufferPool.shared(8192, 4, pin=True)
    assert pool.pinned
    buffer = pool.acquire()
    try:
        assert buffer.tensor.is_pinned()
    finally:
        pool.release(buffer)


@pytest.mark.parametrize("side_stream", [False, True], ids=["default-stream", "training-on-a-side-stream"])
def test_async_save_does_not_wait_for_the_gpu_yet_captures_every_queued_update(tmp_path, side_stream):
    """The call returns while the training stream is busy; the copies run after what it queued."""
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        x = torch.zeros(4 * 1024**2, device="cuda")  # 16 MiB: several staging buffers
        torch.cuda.synchronize()
        busy_gpu(1.0)
        x.add_(1)  # queued behind a second of GPU work: the checkpoint must hold it
        writer = DataStatesWriter(tmp_path / "c", small_config("auto", chunk_bytes="4MiB", host_pool_bytes="32MiB"))
        start = time.perf_counter()
        response = dcp.async_save({"x": x}, storage_writer=writer, no_dist=True)
        returned = time.perf_counter() - start
        assert not stream.query(), "async_save waited for the training stream"
        assert not response.staging_completion.done()
        assert returned < 0.5
        response.staging_completion.result()
        x.add_(1)  # after staging: must not reach the checkpoint
    response.upload_completion.result()
    out = {"x": torch.zeros_like(x)}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert torch.equal(out["x"], torch.ones_like(x))


def test_guard_lets_forward_and_backward_overlap_the_device_copies(tmp_path):
    """With copies still queued behind training work, backward runs; only the optimizer step waits."""
    from dcp_datastates import install_optimizer_guard

    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024, device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    install_optimizer_guard(optimizer)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    busy_gpu(0.5)
    writer = DataStatesWriter(tmp_path / "c", small_config("auto", chunk_bytes="1MiB", host_pool_bytes="16MiB"))
    response = dcp.async_save({"model": model.state_dict()}, storage_writer=writer, no_dist=True)
    model(torch.randn(64, 1024, device="cuda")).sum().backward()  # queued, not waited for
    assert not response.staging_completion.done()
    optimizer.step()  # the guard waits for the copies here
    assert response.staging_completion.done()
    response.upload_completion.result()
    out = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    for name, value in expected.items():
        assert torch.equal(out["model"][name], value), name
    assert not torch.equal(model.weight, expected["weight"])  # the step did run afterwards
