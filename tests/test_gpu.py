"""The CUDA paths of the lazy snapshot: pinned pool, side-stream copies, ordering with training.

Marked ``gpu``: skipped without a CUDA device; on a GPU machine ``python -m pytest -m gpu`` runs
them with the CUDA cases of the lazy-snapshot tests (CONTRIBUTING.md: ``.ci/gpu``).

Timing asserts ("the call returned while the GPU was busy") hold only if nothing in the timed
region launches a kernel for the first time: with CUDA's lazy module loading a first launch
loads its module, and that waits until the device is idle -- behind the very ``_sleep`` the test
queued. Every test therefore runs each kernel it will use once before queueing the wait
(``warm_up``), and ``.ci/gpu`` also sets ``CUDA_MODULE_LOADING=EAGER``.

Every GPU save also asserts its statistics: ``device_copies`` and ``copy_events`` > 0, so a
test fails if the asynchronous device-copy path is not taken (the synchronous fallback writes
the same bytes).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import assert_state_equal, sample_state, small_config, zeros_like_state
from dcp_datastates import DataStatesReader, DataStatesWriter, install_optimizer_guard
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
    torch.cuda._sleep(1_000_000)  # also loads _sleep's module before the long wait is queued
    end.record()
    end.synchronize()
    cycles_per_second = 1_000_000 / (start.elapsed_time(end) / 1000)
    torch.cuda._sleep(int(cycles_per_second * seconds))


def warm_up(tmp_path, state: dict, config) -> None:
    """Run every kernel a save of ``state`` launches (copies, packing, events) once, then wait.

    A throwaway save of a same-shaped state with the same ``config`` (so through the same pool,
    filled by then): the timed save that follows launches nothing for the first time, so lazy
    module loading cannot make it wait for the queued work.
    """
    twin = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    dcp.save(twin, storage_writer=DataStatesWriter(tmp_path / "warm-up", config), no_dist=True)
    for pool in [*HostBufferPool._shared.values(), *HostBufferPool._auto.values()]:
        assert pool.wait_ready(120)  # no pinning (the driver's lock) runs in the background while timing
    torch.cuda.synchronize()


def assert_device_copy_path_taken(writer: DataStatesWriter) -> None:
    """The save copied device tensors asynchronously: per-copy and per-buffer counts in its statistics."""
    stats = writer.last_stats
    assert stats is not None, "the save recorded no statistics"
    assert stats.device_copies > 0, f"no asynchronous device copy was made: {stats}"
    assert stats.copy_events > 0, f"no per-buffer copy event was recorded: {stats}"


def test_gpu_state_round_trips_exactly_and_stock_reads_it(tmp_path, engine):
    state = to_device(sample_state(), "cuda")
    writer = DataStatesWriter(tmp_path / "c", small_config(engine))  # 8 KiB buffers: many device copies
    dcp.save(state, storage_writer=writer, no_dist=True)
    assert_device_copy_path_taken(writer)
    ours = zeros_like_state(state)
    dcp.load(ours, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert_state_equal(ours, state)
    host = to_device(state, "cpu")
    stock = zeros_like_state(host)
    dcp.load(stock, storage_reader=dcp.FileSystemReader(tmp_path / "c"), no_dist=True)
    assert_state_equal(stock, host)


def test_the_pool_is_pinned_so_device_copies_run_asynchronously():
    pool = HostBufferPool.shared(8192, 4, pin=True)
    assert pool.wait_ready(60) and pool.ready == 4
    assert pool.pinned, pool.pin_error
    buffers = [pool.acquire() for _ in range(4)]
    try:
        assert all(b.pinned and b.tensor.is_pinned() for b in buffers)
    finally:
        for b in buffers:
            pool.release(b)


def test_pool_is_registered_by_its_filler_thread_in_the_callers_device_context(monkeypatch):
    """cudaHostRegister runs on the pool's own thread, after it selected the caller's device."""
    import threading

    from dcp_datastates import buffer_pool

    seen: list[tuple[str, int]] = []
    real = torch.cuda.cudart()

    class Recording:
        def __getattr__(self, name):
            return getattr(real, name)

        def cudaHostRegister(self, address, length, flags):  # noqa: N802 - CUDA's name
            seen.append((threading.current_thread().name, torch.cuda.current_device()))
            return real.cudaHostRegister(address, length, flags)

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Recording())
    monkeypatch.setattr(buffer_pool.HostBufferPool, "_shared", {})
    device = torch.cuda.device_count() - 1  # the last GPU: not the default one where there are several
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        pool = buffer_pool.HostBufferPool.shared(1 << 20, 3, pin=True)
    assert pool.wait_ready(60) and pool.pinned, pool.pin_error
    assert seen == [("dcp-datastates-pool-fill", device)] * 3


@pytest.mark.parametrize("side_stream", [False, True], ids=["default-stream", "training-on-a-side-stream"])
def test_async_save_does_not_wait_for_the_gpu_yet_captures_every_queued_update(tmp_path, side_stream):
    """The call returns while the training stream is busy; the copies run after what it queued."""
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        x = torch.zeros(4 * 1024**2, device="cuda")  # 16 MiB: several staging buffers
        x.add_(0)
        # A parameter of a guarded optimizer: read lazily from the live tensor on the copy stream. (With no
        # optimizer known, capture would copy it to the host synchronously -- and the call would wait.)
        optimizer = torch.optim.SGD([x], lr=0.0)
        install_optimizer_guard(optimizer)
        config = small_config("auto", chunk_bytes="4MiB", host_pool_bytes="32MiB")
        warm_up(tmp_path, {"x": x}, config)
        busy_gpu(1.0)
        x.add_(1)  # queued behind a second of GPU work: the checkpoint must hold it
        writer = DataStatesWriter(tmp_path / "c", config)
        start = time.perf_counter()
        response = dcp.async_save({"x": x}, storage_writer=writer, no_dist=True)
        returned = time.perf_counter() - start
        assert not stream.query(), "async_save waited for the training stream"
        assert not response.staging_completion.done()
        assert returned < 0.5
        assert writer.last_capture.tensors_captured == 0  # x is read where it lives: the lazy path
        response.staging_completion.result()
        x.add_(1)  # after staging: must not reach the checkpoint
    response.upload_completion.result()
    assert_device_copy_path_taken(writer)
    assert optimizer.param_groups[0]["params"][0] is x  # the guard's optimizer lived through the save
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
    # Warm up forward, backward and the optimizer step on a twin (the model itself must not change),
    # and a save of the same state: nothing below launches a kernel for the first time.
    twin = torch.nn.Linear(1024, 1024, device="cuda")
    twin(torch.randn(64, 1024, device="cuda")).sum().backward()
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    config = small_config("auto", chunk_bytes="1MiB", host_pool_bytes="16MiB")
    warm_up(tmp_path, model.state_dict(), config)
    busy_gpu(0.5)
    writer = DataStatesWriter(tmp_path / "c", config)
    response = dcp.async_save({"model": model.state_dict()}, storage_writer=writer, no_dist=True)
    model(torch.randn(64, 1024, device="cuda")).sum().backward()  # queued, not waited for
    assert not response.staging_completion.done()
    optimizer.step()  # the guard waits for the copies here
    assert response.staging_completion.done()
    response.upload_completion.result()
    assert_device_copy_path_taken(writer)
    out = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    for name, value in expected.items():
        assert torch.equal(out["model"][name], value), name
    assert not torch.equal(model.weight, expected["weight"])  # the step did run afterwards


def flat(value: object, prefix: str = "") -> dict[str, object]:
    """Every leaf of nested dicts and lists, by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
    return {prefix: value}


def assert_same_values(actual: dict, expected: dict) -> None:
    got, want = flat(actual), flat(expected)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key].cpu(), value.cpu()), key
        else:
            assert got[key] == value, key


def test_state_changed_right_after_async_save_returns_stays_out_of_the_checkpoint(tmp_path):
    """Training resumes the moment async_save returns, while the device copies still wait behind queued work.

    Right then a buffer is written in place (captured at the call) and a whole step runs: forward
    updates BatchNorm's running statistics, the optimizer step -- which waits for the copies --
    changes every parameter and moment. The checkpoint holds the state as it was at the call, to the
    byte; none of the later values leaks into it.
    """
    def make(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.BatchNorm1d(512), torch.nn.Linear(512, 64))
        model = model.cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, optimizer

    def step(model, optimizer) -> None:
        model(torch.randn(32, 256, device="cuda")).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    model, optimizer = make(0)
    install_optimizer_guard(optimizer)
    for _ in range(2):
        step(model, optimizer)  # the moments exist, and every kernel of a step has run once
    expected = copy.deepcopy({"model": model.state_dict(), "optim": optimizer.state_dict()})
    config = small_config("auto", chunk_bytes="1MiB", host_pool_bytes="16MiB")
    warm_up(tmp_path, {"model": model.state_dict(), "optim": optimizer.state_dict()}, config)
    torch.zeros(512, device="cuda").add_(1000.0)  # the in-place add below: launched once before the timed region
    torch.cuda.synchronize()
    busy_gpu(1.0)
    writer = DataStatesWriter(tmp_path / "c", config)
    start = time.perf_counter()
    response = dcp.async_save({"model": model.state_dict(), "optim": optimizer.state_dict()}, storage_writer=writer,
                              no_dist=True)
    returned = time.perf_counter() - start
    assert not response.staging_completion.done(), "the copies ran before training resumed: nothing raced them"
    with torch.no_grad():
        model[1].running_mean.add_(1000.0)  # in place, at once, outside any optimizer step
    step(model, optimizer)  # the optimizer step inside waits for the copies
    assert response.staging_completion.done()
    response.upload_completion.result()
    assert returned < 0.5
    assert_device_copy_path_taken(writer)
    assert writer.last_capture.tensors_captured >= 3  # running_mean, running_var, num_batches_tracked

    live = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    for key in ("1.running_mean", "1.num_batches_tracked", "0.weight", "2.bias"):
        assert not torch.equal(live["model"][key], expected["model"][key]), f"{key} did not change: nothing raced"
    fresh_model, fresh_optimizer = make(1)
    step(fresh_model, fresh_optimizer)  # its moments exist, to load into
    target = {"model": fresh_model.state_dict(), "optim": fresh_optimizer.state_dict()}
    dcp.load(target, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert_same_values(target, expected)
