"""Lazy snapshots: async_save returns at once, training goes on, the checkpoint holds the saved step."""

from __future__ import annotations

import copy
import dataclasses
import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from conftest import small_config
from dcp_datastates import DataStatesReader, DataStatesWriter, install_optimizer_guard
from dcp_datastates import chunk_stream
from dcp_datastates.native import pwrite_engine
from dcp_datastates.native.pwrite_engine import ThreadPoolWriteEngine
from dcp_datastates.native.uring_engine import IoUringWriteEngine

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


#: How long a held side waits for its counterpart before the test fails (never a hang).
HOLD_S = 20.0
#: How long a step that reached the optimizer gets to run past the guard while the copies are held.
STEP_CHANCE_S = 1.5


class HeldCopies:
    """Holds the snapshot's first tensor copy until the training step has had its chance to run.

    The test's training loop calls ``optimizer.step`` while the copies are held. A working
    guard blocks that step before it writes a parameter, so the hold ends after ``STEP_CHANCE_S``;
    a guard that lets the step through reaches ``after_guards`` while the copies are still held,
    which is recorded -- deterministically, whatever the state's size or the machine's speed.
    """

    def __init__(self) -> None:
        self.step_entered = threading.Event()  # optimizer.step() was called
        self.step_passed_guards = threading.Event()  # ... and is about to update parameters
        self.released = threading.Event()
        self.held = False
        self.steps_past_guards_while_held = 0

    def hold(self) -> None:
        """Run on the snapshot's side in place of its first tensor copy."""
        if self.held:
            return
        self.held = True
        try:
            assert self.step_entered.wait(HOLD_S), "the training loop never called optimizer.step()"
            self.step_passed_guards.wait(STEP_CHANCE_S)
        finally:
            self.released.set()

    def after_guards(self, optimizer, args, kwargs) -> None:
        """An optimizer pre-step hook registered after the guard: runs right before the update."""
        if not self.released.is_set():
            self.steps_past_guards_while_held += 1
        self.step_passed_guards.set()

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        step = optimizer.step

        def entered(*args, **kwargs):  # before every hook, global or not
            self.step_entered.set()
            return step(*args, **kwargs)

        optimizer.step = entered
        optimizer.register_step_pre_hook(self.after_guards)


@pytest.fixture
def held_copies(monkeypatch) -> HeldCopies:
    """The first tensor a save resolves (before copying it) waits on a ``HeldCopies``."""
    held = HeldCopies()
    real = DefaultSavePlanner.resolve_data

    def resolve_data(self, write_item):
        if write_item.type.name != "BYTE_IO":
            held.hold()
        return real(self, write_item)

    monkeypatch.setattr(DefaultSavePlanner, "resolve_data", resolve_data)
    return held


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_holds_exactly_the_saved_step_while_training_continues(tmp_path, device, held_copies):
    model, optimizer = make_training(device)
    guard = install_optimizer_guard(optimizer)
    for step in range(3):
        train_step(model, optimizer, step, device)
    held_copies.watch(optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    expected = copy.deepcopy({"model": model_sd, "optim": optim_sd})
    writer = DataStatesWriter(tmp_path / "c", small_config("threads", chunk_bytes=4096, host_pool_bytes=64 * 4096))
    response = dcp.async_save({"model": model_sd, "optim": optim_sd, "step": 3}, storage_writer=writer, no_dist=True)
    assert isinstance(response, AsyncSaveResponse)
    for step in range(3, 8):  # forward, backward and optimizer steps mutate the live state
        train_step(model, optimizer, step, device)
    assert held_copies.held and held_copies.released.is_set()  # the step really raced the held copies
    assert held_copies.steps_past_guards_while_held == 0, "an optimizer step ran while the snapshot was still copying"
    assert response.staging_completion.done()  # the guard waited for it before the first step
    response.upload_completion.result(timeout=60)
    guard.remove()
    if device == "cuda":  # the asynchronous device-copy path was taken (the synchronous one writes the same bytes)
        assert writer.last_stats.device_copies > 0 and writer.last_stats.copy_events > 0, writer.last_stats
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


@pytest.fixture
def held_disk(monkeypatch):
    """Every write of either engine waits at submission until the test opens the gate.

    Yields ``(gate, completed)``: ``completed`` counts writes the engine reported done.
    The gate opens on teardown too, so a failing test leaves no thread behind.
    """
    gate = threading.Event()
    completed = []

    def held(real):
        def submit(self, request):
            if not gate.wait(HOLD_S):
                raise RuntimeError("the test never opened the disk gate")
            on_done = request.on_done

            def counted(error):
                completed.append(error)
                on_done(error)

            return real(self, dataclasses.replace(request, on_done=counted))

        return submit

    for cls in (ThreadPoolWriteEngine, IoUringWriteEngine):
        monkeypatch.setattr(cls, "submit", held(cls.submit))
    yield gate, completed
    gate.set()


def test_staging_completes_before_upload_when_the_pool_holds_the_state(tmp_path, engine, held_disk):
    gate, completed = held_disk
    state = {f"w{i}": torch.randn(4096) for i in range(16)}  # 256 KiB, pool 1 MiB
    expected = {k: v.clone() for k, v in state.items()}
    writer = DataStatesWriter(tmp_path / "c", small_config(engine, chunk_bytes=16384, host_pool_bytes=64 * 16384))
    response = dcp.async_save(state, storage_writer=writer, no_dist=True)
    # Not a single write can have finished: staging must not wait for the disk.
    response.staging_completion.result(timeout=HOLD_S)
    assert completed == [] and not response.upload_completion.done()  # bytes copied out, disk held
    for value in state.values():
        value.fill_(-1.0)  # training overwrites the live state: the checkpoint must not see it
    gate.set()
    response.upload_completion.result(timeout=60)
    assert len(completed) >= 16 and all(error is None for error in completed)
    out = {k: torch.zeros(4096) for k in state}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert all(torch.equal(out[k], v) for k, v in expected.items())  # the state as it was when saved


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
    from dcp_datastates.snapshot import _in_flight  # the snapshots still reading live state
    assert all(s.staged.done() for s in list(_in_flight)), "optimizer.step() returned while a snapshot read live state"
    # DCP's staging future follows a moment later: its skeleton is built once the copies are done
    response.staging_completion.result(timeout=30)
    response.upload_completion.result()


def test_one_writer_cannot_serve_two_saves_in_flight(tmp_path, slow_disk):
    writer = DataStatesWriter(tmp_path / "c", small_config("threads"))
    writer.stage({"w": torch.randn(20_000)})  # as async_save would, without the save that consumes it
    with pytest.raises(RuntimeError, match="one DataStatesWriter per checkpoint"):
        writer.stage({"w": torch.randn(20_000)})
    writer._snapshot.done.result()  # let the background snapshot finish before tmp_path goes away
