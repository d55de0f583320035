"""Lazy snapshots: async_save returns at once, training goes on, the checkpoint holds the saved step."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from conftest import small_config
from dcp_datastates import DataStatesReader, DataStatesWriter, install_optimizer_guard
from dcp_datastates import chunk_stream
from dcp_datastates.native import pwrite_engine

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_training(device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer


def train_step(model, optimizer, step: int, device: str) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 32, generator=g).to(device), torch.randn(16, 8, generator=g).to(device)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.fixture
def slow_disk(monkeypatch):
    """Every pwrite takes 20 ms more, so a save is still writing while training goes on."""
    real = pwrite_engine.write_fully

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(pwrite_engine, "write_fully", slow)


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_holds_exactly_the_saved_step_while_training_continues(tmp_path, device, slow_disk):
    model, optimizer = make_training(device)
    guard = install_optimizer_guard(optimizer)
    for step in range(3):
        train_step(model, optimizer, step, device)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    expected = copy.deepcopy({"model": model_sd, "optim": optim_sd})
    writer = DataStatesWriter(tmp_path / "c", small_config("threads", chunk_bytes=4096, host_pool_bytes=64 * 4096))
    response = dcp.async_save({"model": model_sd, "optim": optim_sd, "step": 3}, storage_writer=writer, no_dist=True)
    assert isinstance(response, AsyncSaveResponse)
    for step in range(3, 8):  # forward, backward and optimizer steps mutate the live state
        train_step(model, optimizer, step, device)
    assert response.staging_completion.done()  # the guard waited for it before the first step
    response.upload_completion.result()
    guard.remove()
    assert not torch.equal(next(model.parameters()).cpu(), expected["model"]["0.weight"].cpu())  # training moved on

    fresh_model, fresh_optimizer = make_training(device, seed=123)
    fresh_model_sd, fresh_optim_sd = get_state_dict(fresh_model, fresh_optimizer)
    target = {"model": fresh_model_sd, "optim": fresh_optim_sd, "step": 0}
    dcp.load(target, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    for name, value in expected["model"].items():
        assert torch.equal(target["model"][name].cpu(), value.cpu()), name
    for pid, state in expected["optim"]["state"].items():
        for key, value in state.items():
            assert torch.equal(target["optim"]["state"][pid][key].cpu(), value.cpu()), (pid, key)
    assert target["step"] == 3


def test_staging_completes_before_upload_when_the_pool_holds_the_state(tmp_path, slow_disk):
    state = {f"w{i}": torch.randn(4096) for i in range(16)}  # 256 KiB, pool 1 MiB
    writer = DataStatesWriter(tmp_path / "c", small_config("threads", chunk_bytes=16384, host_pool_bytes=64 * 16384))
    start = time.perf_counter()
    response = dcp.async_save(state, storage_writer=writer, no_dist=True)
    returned = time.perf_counter() - start
    response.staging_completion.result()
    staged_at = time.perf_counter() - start
    assert not response.upload_completion.done()  # bytes copied out, disk still busy
    response.upload_completion.result()
    uploaded_at = time.perf_counter() - start
    assert staged_at < uploaded_at and returned < uploaded_at
    out = {k: torch.zeros(4096) for k in state}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_staging_waits_for_the_copies_alone_not_for_checksums_or_the_disk(tmp_path, monkeypatch):
    """Checksums and writes read the pool, not the live state: training must not wait for them."""
    gate = threading.Event()
    real = chunk_stream.block_checksums

    def gated(view, block_bytes):
        assert gate.wait(timeout=60), "staging never completed while checksums were held back"
        return real(view, block_bytes)

    monkeypatch.setattr(chunk_stream, "block_checksums", gated)
    state = {f"w{i}": torch.randn(4096) for i in range(16)}  # 256 KiB, pool 1 MiB
    writer = DataStatesWriter(tmp_path / "c", small_config("threads", chunk_bytes=16384, host_pool_bytes=64 * 16384))
    response = dcp.async_save(state, storage_writer=writer, no_dist=True)
    response.staging_completion.result(timeout=30)  # no buffer has been checksummed or written yet
    assert not response.upload_completion.done()
    gate.set()
    response.upload_completion.result()
    assert writer.last_stats.tensor_writes >= 16
    out = {k: torch.zeros(4096) for k in state}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)  # verifies the checksums
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_state_larger_than_the_pool_streams_and_staging_waits_for_the_disk(tmp_path, slow_disk):
    state = {f"w{i}": torch.randn(16384) for i in range(8)}  # 512 KiB through a 32 KiB pool
    writer = DataStatesWriter(tmp_path / "c", small_config("threads", chunk_bytes=8192, host_pool_bytes=4 * 8192))
    response = dcp.async_save(state, storage_writer=writer, no_dist=True)
    response.staging_completion.result()
    response.upload_completion.result()
    assert writer.last_stats.tensor_writes >= 64
    out = {k: torch.zeros(16384) for k in state}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_forward_and_backward_never_wait_only_the_optimizer_step_does(tmp_path, slow_disk):
    model, optimizer = make_training("cpu")
    install_optimizer_guard(optimizer)
    state = {"model": model.state_dict()} | {f"pad{i}": torch.randn(8192) for i in range(32)}
    writer = DataStatesWriter(tmp_path / "c", small_config("threads", chunk_bytes=8192, host_pool_bytes=4 * 8192))
    response = dcp.async_save(state, storage_writer=writer, no_dist=True)
    x = torch.randn(16, 32)
    loss = model(x).sum()
    loss.backward()  # forward and backward run while the snapshot is still copying
    assert not response.staging_completion.done()
    optimizer.step()  # the guard blocks here until the copies are done
    assert response.staging_completion.done()
    response.upload_completion.result()


def test_one_writer_cannot_serve_two_saves_in_flight(tmp_path, slow_disk):
    writer = DataStatesWriter(tmp_path / "c", small_config("threads"))
    writer.stage({"w": torch.randn(20_000)})  # as async_save would, without the save that consumes it
    with pytest.raises(RuntimeError, match="one DataStatesWriter per checkpoint"):
        writer.stage({"w": torch.randn(20_000)})
    writer._snapshot.done.result()  # let the background snapshot finish before tmp_path goes away
