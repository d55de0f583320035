"""A lazy snapshot taken at step N is exactly step N, whatever training does next (issue 16.2, 16.3).

Every test holds the snapshot thread at a gate before it reads a single tensor, so the
dangerous interleaving -- training writes state before the snapshot copied it -- happens
by construction, not by luck of timing. Before the fix, buffers written by forward
(BatchNorm statistics), the optimizer step without ``install_optimizer_guard``, and
in-place writes to tensors no optimizer owns all leaked step N+1 into the checkpoint.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import small_config
from dcp_datastates import DataStatesReader, DataStatesWriter, install_optimizer_guard
from dcp_datastates import writer as writer_module
from dcp_datastates.snapshot import Snapshot


@pytest.fixture
def gate(monkeypatch):
    """The snapshot thread waits here before copying any tensor; the test opens it."""
    opened = threading.Event()
    real = Snapshot._write_tensors

    def gated(self, *args, **kwargs):
        assert opened.wait(30), "test never opened the gate"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Snapshot, "_write_tensors", gated)
    yield opened
    opened.set()


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def step(model, optimizer, n: int, *, do_step: bool = True) -> None:
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    if do_step:
        optimizer.step()


def state_of(model, optimizer) -> dict:
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def flat(state: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat(value, f"{name}.")
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                out |= flat(v, f"{name}.{i}.")
        else:
            out[name] = value
    return out


def assert_checkpoint_equals(path, expected: dict) -> None:
    target = copy.deepcopy(expected)
    for value in flat(target).values():
        if isinstance(value, torch.Tensor):
            value.zero_() if value.dtype != torch.bool else value.fill_(False)
    dcp.load(target, storage_reader=DataStatesReader(path))
    got, want = flat(target), flat(expected)
    assert got.keys() == want.keys()
    wrong = [k for k in want if not (torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor) else got[k] == want[k])]
    assert not wrong, f"{len(wrong)} of {len(want)} entries are not step N: {wrong[:8]}"


@pytest.mark.parametrize("guard", [True, False], ids=["with_guard", "without_guard"])
def test_forward_backward_step_right_after_async_save_leave_step_n(tmp_path, gate, guard):
    model, optimizer = make_model()
    for n in range(3):
        step(model, optimizer, n)
    if guard:
        install_optimizer_guard(optimizer)
    expected = copy.deepcopy(state_of(model, optimizer))
    writer = DataStatesWriter(tmp_path / "ckpt", small_config("threads"))
    response = dcp.async_save(state_of(model, optimizer), storage_writer=writer)

    step(model, optimizer, 3, do_step=False)  # forward (BatchNorm statistics change) and backward
    assert not response.staging_completion.done()  # the snapshot has not read one live tensor yet
    assert model[1].num_batches_tracked.item() == 4 and not torch.equal(model[1].running_mean, expected["model"]["1.running_mean"])
    threading.Timer(0.2, gate.set).start()
    optimizer.step()  # must wait until the snapshot has copied the parameters and the Adam moments
    assert gate.is_set()
    response.upload_completion.result()
    assert not torch.equal(model[0].weight, expected["model"]["0.weight"])  # training did move on
    assert_checkpoint_equals(tmp_path / "ckpt", expected)
    # Lazy where it may be: only the three BatchNorm buffers were copied before async_save returned.
    assert writer.last_capture.tensors_captured == 3 and writer.last_capture.optimizers_known >= 1


def test_in_place_writes_to_tensors_no_optimizer_owns_do_not_reach_the_checkpoint(tmp_path, gate):
    model, optimizer = make_model(1)
    for n in range(2):
        step(model, optimizer, n)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    big = torch.randn(400_000)  # spans many staging buffers: a partial update would tear it
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "ema": ema, "big": big,
             "loop": {"seen": [1, 2, 3], "epoch": 5}}
    expected = copy.deepcopy(state)
    writer = DataStatesWriter(tmp_path / "ckpt", small_config("threads", host_pool_bytes="8MiB"))
    response = dcp.async_save(state, storage_writer=writer)
    assert not response.staging_completion.done() and not writer.last_capture.over_budget
    big.add_(1)
    for value in ema.values():
        value.mul_(0.5).add_(1)
    state["loop"]["seen"].append(4)  # a mutable object changed in place
    gate.set()
    response.upload_completion.result()
    assert_checkpoint_equals(tmp_path / "ckpt", expected)


def test_without_any_known_optimizer_everything_is_captured(tmp_path, gate):
    torch.manual_seed(3)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # a fresh optimizer: never stepped, never guarded
    expected = copy.deepcopy(state_of(model, optimizer))
    writer = DataStatesWriter(tmp_path / "ckpt", small_config("threads"))
    response = dcp.async_save(state_of(model, optimizer), storage_writer=writer)
    with torch.no_grad():
        model.weight.add_(1)  # by hand, outside any optimizer
    gate.set()
    response.upload_completion.result()
    assert_checkpoint_equals(tmp_path / "ckpt", expected)
    assert writer.last_capture.tensors_captured == 2  # weight and bias: nothing was known to be guarded


def test_optimizer_steps_do_not_wait_once_no_snapshot_reads_live_state(tmp_path):
    model, optimizer = make_model(2)
    step(model, optimizer, 0)
    response = dcp.async_save(state_of(model, optimizer), storage_writer=DataStatesWriter(tmp_path / "c", small_config("threads")))
    response.upload_completion.result()
    done = threading.Event()
    worker = threading.Thread(target=lambda: (step(model, optimizer, 1), done.set()))
    worker.start()
    worker.join(10)
    assert done.is_set()


def test_more_unguarded_state_than_the_pool_is_staged_before_async_save_returns(tmp_path, monkeypatch):
    """No optimizer known and 4 MiB unguarded against a 2 MiB budget: no copy aside, the call stages it all."""
    monkeypatch.setattr(writer_module, "CAPTURE_BUDGET_FLOOR", 2 * 1024**2)
    read_live: list[bool] = []
    real = Snapshot._write_tensors

    def recording(self, *args, **kwargs):
        read_live.append(True)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Snapshot, "_write_tensors", recording)
    big = torch.randn(1_000_000)
    state = {"big": big, "step": 3}
    expected = copy.deepcopy(state)
    writer = DataStatesWriter(tmp_path / "ckpt", small_config("threads"))
    response = dcp.async_save(state, storage_writer=writer)
    assert read_live and response.staging_completion.done()  # staged inside the call
    assert writer.last_capture.over_budget and writer.last_capture.tensors_captured == 0
    big.add_(1)
    response.upload_completion.result()
    assert_checkpoint_equals(tmp_path / "ckpt", expected)
