"""Batched captures: the copies ``stage()`` makes of unowned tensors are exact, private, and never reused too early."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import small_config
from dcp_datastates import DataStatesReader, DataStatesWriter, batch_copy
from dcp_datastates.capture import capture_mutable
from dcp_datastates.snapshot import Snapshot


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(6, 5, generator=g)
    return {
        **{f"w{i}": torch.randn(4, 3, generator=g) for i in range(40)},  # one shape, many tensors: one stack
        "odd": torch.randn(7, generator=g),
        "scalar": torch.tensor(3.5),
        "half": torch.randn(9, generator=g).to(torch.bfloat16),
        "ints": torch.randint(-5, 5, (2, 2, 2), generator=g),
        "flags": torch.rand(5, generator=g) > 0.5,
        "column": base[:, 1],  # not contiguous: copied on its own
        "grad": torch.randn(3, generator=g).requires_grad_(),  # requires_grad: copied on its own, flag kept
    }


def test_captured_copies_are_exact_private_and_the_plain_ones_share_one_arena():
    tensors = mixed_tensors()
    expected = {k: v.detach().clone() for k, v in tensors.items()}
    captured = capture_mutable({"m": tensors}, budget_bytes=1 << 30).state_dict["m"]
    assert captured.keys() == tensors.keys()
    for key, copy in captured.items():
        assert copy.dtype == expected[key].dtype and copy.shape == expected[key].shape, key
        assert torch.equal(copy.detach(), expected[key]), key
    assert captured["grad"].requires_grad and not captured["w0"].requires_grad
    with torch.no_grad():
        for value in tensors.values():  # training writes every live tensor right after the call
            value.add_(1) if value.dtype != torch.bool else value.logical_not_()
    assert all(torch.equal(captured[k].detach(), expected[k]) for k in tensors)
    batched = [k for k in tensors if batch_copy.batchable(tensors[k])]
    assert "column" not in batched and "grad" not in batched and len(batched) == 45
    storages = {captured[k].untyped_storage().data_ptr() for k in batched}
    assert len(storages) == 1  # one arena holds every batched copy: the stack path was taken
    assert captured["column"].untyped_storage().data_ptr() not in storages


def test_an_arena_is_reused_only_once_no_capture_views_it():
    state = {"m": {f"t{i}": torch.full((256,), float(i)) for i in range(64)}}
    batch_copy.release_capture_arenas()
    first = capture_mutable(state, budget_bytes=1 << 30).state_dict["m"]
    made = batch_copy.arenas_made
    second = capture_mutable(state, budget_bytes=1 << 30).state_dict["m"]  # the first still holds its arena
    assert batch_copy.arenas_made == made + 1
    assert first["t0"].untyped_storage().data_ptr() != second["t0"].untyped_storage().data_ptr()
    keep = first["t5"]  # one view keeps the whole arena in use
    del first
    third = capture_mutable(state, budget_bytes=1 << 30).state_dict["m"]
    assert batch_copy.arenas_made == made + 2
    assert third["t0"].untyped_storage().data_ptr() not in {keep.untyped_storage().data_ptr(),
                                                              second["t0"].untyped_storage().data_ptr()}
    del keep
    fourth = capture_mutable(state, budget_bytes=1 << 30).state_dict["m"]
    assert batch_copy.arenas_made == made + 2  # the first capture's arena, free again, was reused
    assert all(torch.equal(c[f"t{i}"], torch.full((256,), float(i))) for c in (second, third, fourth) for i in range(64))


@pytest.mark.parametrize("slice_bytes", [1, 100, 1 << 20], ids=["one-per-slice", "few-per-slice", "one-slice"])
def test_the_gpu_paths_gather_exact_private_copies(slice_bytes):
    """The GPU-to-host (sliced gather) and GPU-to-GPU (foreach) paths, run on CPU tensors: same logic, any device."""
    g = torch.Generator().manual_seed(2)
    group = [torch.randn(5, 3, generator=g), torch.randn(8, generator=g), torch.randn(2, 2, 2, generator=g), torch.randn(1, generator=g)]
    expected = [t.clone() for t in group]
    for copies in (batch_copy._gathered_to_host(group, slice_bytes), batch_copy._flat_on_device(group)):
        assert [c.shape for c in copies] == [t.shape for t in group]
        for t in group:
            t.add_(1)
        assert all(torch.equal(c, e) for c, e in zip(copies, expected))
        for t, e in zip(group, expected):
            t.copy_(e)


def test_back_to_back_async_saves_with_a_new_writer_each_keep_each_step(tmp_path, monkeypatch):
    """Save N is still reading its captured copies while save N+1 captures: N+1 must get an arena of its own."""
    opened = threading.Event()
    real = Snapshot._write_tensors
    held_back: list[bool] = []

    def gated(self, *args, **kwargs):
        if not held_back:  # only the first save's snapshot waits
            held_back.append(True)
            assert opened.wait(60), "test never opened the gate"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Snapshot, "_write_tensors", gated)
    live = {f"b{i}": torch.full((64,), float(i)) for i in range(300)}  # no optimizer owns them: all captured
    steps = []
    for n in range(2):
        steps.append({k: v.clone() for k, v in live.items()})
        response = dcp.async_save({"m": live}, storage_writer=DataStatesWriter(tmp_path / f"s{n}", small_config("threads")))
        for value in live.values():
            value.add_(1000)  # training moves on at once
        if n == 0:
            first = response
        else:
            second = response
    opened.set()
    first.upload_completion.result(timeout=60)
    second.upload_completion.result(timeout=60)
    for n in range(2):
        out = {"m": {k: torch.zeros(64) for k in live}}
        dcp.load(out, storage_reader=DataStatesReader(tmp_path / f"s{n}"))
        wrong = [k for k in live if not torch.equal(out["m"][k], steps[n][k])]
        assert not wrong, (n, wrong[:5])
