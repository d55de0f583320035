"""DCP's documented save/load behaviour, asserted alike for stock storage and ours.

Every scenario is parametrized over ``stock`` (``FileSystemWriter``/``FileSystemReader``) and
``ours`` (``DataStatesWriter``/``DataStatesReader``) and runs the same assertions; a
checkpoint written by one side is read by both. Where ours differs on purpose (safe
loading, ``use_collectives=False``), the difference is asserted, not skipped. Written
from DCP's documented API (``dcp.save``/``async_save``/``load`` and their options), not
copied from PyTorch's tests. Multi-rank scenarios (DTensor resharding 2 -> 4 -> 1,
``process_group``, ``no_dist`` on one rank of many, async PROCESS) run in two torchrun
launches, ``tests/multirank/conformance.py``.
"""

from __future__ import annotations

import io
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
from torch.distributed.checkpoint.stateful import Stateful

from conftest import MULTIRANK, torchrun_script
from dcp_datastates import CheckpointExistsError, DataStatesConfig, DataStatesWriter, InvalidOptionError, UnsafeCheckpointError

sys.path.insert(0, str(MULTIRANK))
from conformance_state import (  # noqa: E402
    SIDES,
    TrainState,
    assert_same,
    finished,
    full_tensors,
    losses_blob,
    quantized,
    quantized_targets,
    reader,
    staged,
    writer,
)

side = pytest.mark.parametrize("side", SIDES)
written_by = pytest.mark.parametrize("written_by", SIDES)


def load(side: str, path: Path, state: dict, **kwargs) -> dict:
    dcp.load(state, storage_reader=reader(side, path), no_dist=True, **kwargs)
    return state


def inner_error(caught: pytest.ExceptionInfo) -> BaseException:
    """The one rank's exception inside DCP's ``CheckpointException``."""
    (failure,) = caught.value.failures.values()
    return failure[0]


# -- a training job: model + Adam through get_state_dict/set_state_dict, and a TrainState with a BytesIO


class AppState(Stateful):
    """Model and optimizer through DCP's ``get_state_dict``/``set_state_dict`` (the documented recipe)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])


@dataclass
class Job:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train: TrainState

    def step(self) -> None:
        x = torch.full((2, 4), 0.25 * (self.train.step + 1))
        loss = self.model(x).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.train.step += 1
        self.train.losses.append(loss.item())

    def to_save(self) -> dict:
        return {"app": AppState(self.model, self.optimizer), "train": self.train}

    def values(self) -> dict:
        """Everything the checkpoint must hold, copied (exact step-N values)."""
        state = self.optimizer.state_dict()
        return {
            "params": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optim": {i: {k: v.clone() for k, v in s.items()} for i, s in state["state"].items()},
            "step": self.train.step,
            "losses": list(self.train.losses),
        }


def new_job(steps: int, seed: int = 0) -> Job:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    job = Job(model, torch.optim.Adam(model.parameters(), lr=0.1), TrainState())
    for _ in range(steps):
        job.step()
    return job


def assert_resumes(side: str, path: Path, expected: dict) -> None:
    fresh = new_job(steps=0, seed=99)  # other weights, an optimizer with no state yet
    dcp.load(fresh.to_save(), storage_reader=reader(side, path), no_dist=True)
    assert_same(fresh.values(), expected, f"read by {side}")
    assert fresh.train.loaded_blob.getvalue() == losses_blob(expected["losses"]).getvalue()  # the exact bytes saved


MODES = ["sync", "async_thread", "user_stager", "cache_staged_state_dict"]


@pytest.mark.parametrize("mode", MODES)
@written_by
def test_a_training_job_resumes_exactly_at_the_saved_step(tmp_path, mode, written_by):
    """Model + Adam + a TrainState whose losses are a BytesIO of ``torch.save``, each way DCP saves.

    Async saves step the optimizer as soon as DCP's staging contract allows: the checkpoint
    must still hold the step it was asked to save. Both readers load it.
    """
    job = new_job(steps=3)
    expected = job.values()
    path = tmp_path / "ckpt"
    if mode == "sync":
        dcp.save(job.to_save(), storage_writer=writer(written_by, path), no_dist=True)
    else:
        stager = DefaultStager(StagingOptions(False, False, True, False)) if mode == "user_stager" else None
        storage = writer(written_by, path, cache_staged_state_dict=mode == "cache_staged_state_dict")
        if mode == "cache_staged_state_dict" and written_by == "stock" and not torch.cuda.is_available():
            # stock's cached staging allocates pinned memory: it needs an accelerator (ours does not)
            with pytest.raises(RuntimeError, match="accelerator"):
                dcp.async_save(job.to_save(), storage_writer=storage, no_dist=True)
            return
        response = dcp.async_save(job.to_save(), storage_writer=storage, async_stager=stager, no_dist=True)
        staged(response)
        job.step()  # training goes on while the checkpoint is written
        finished(response)
        if stager is not None:
            stager.close()
        assert job.values()["step"] == expected["step"] + 1
    for read_by in SIDES:
        assert_resumes(read_by, path, expected)


@side
def test_stateful_and_plain_dict_loads_read_the_same_checkpoint(tmp_path, side):
    """Saved through Stateful objects, loaded into plain state dicts (and back): DCP only sees the dicts."""
    job = new_job(steps=2)
    expected = job.values()
    dcp.save(job.to_save(), storage_writer=writer(side, tmp_path / "c"), no_dist=True)
    fresh = new_job(steps=0, seed=5)
    plain = {"app": AppState(fresh.model, fresh.optimizer).state_dict(), "train": fresh.train.state_dict()}
    dcp.load(plain, storage_reader=reader(side, tmp_path / "c"), no_dist=True)
    assert_same(plain["app"]["model"], expected["params"], "model")
    assert int(plain["train"]["step"]) == expected["step"]
    assert plain["train"]["losses"].getvalue() == losses_blob(expected["losses"]).getvalue()
    # and a plain dict saved is loaded by a Stateful
    dcp.save(plain, storage_writer=writer(side, tmp_path / "plain"), no_dist=True)
    assert_resumes(side, tmp_path / "plain", expected)


# -- BytesIO and plain objects


@written_by
def test_bytesio_comes_back_as_a_bytesio_holding_the_same_bytes(tmp_path, written_by):
    """Its bytes are never unpickled by the loader: a BytesIO holding a hostile pickle is handed back as is."""
    marker = tmp_path / "ran"
    hostile = pickle.dumps(_Touch(marker))
    moved = io.BytesIO(b"0123456789")
    moved.seek(4)
    state = {"blob": io.BytesIO(b"abc"), "empty": io.BytesIO(), "moved": moved, "hostile": io.BytesIO(hostile),
             "nested": {"inner": [io.BytesIO(b"\x00\xff" * 100)]}}
    dcp.save(state, storage_writer=writer(written_by, tmp_path / "c"), no_dist=True)
    for read_by in SIDES:
        target = {"blob": io.BytesIO(b"old"), "empty": None, "moved": None, "hostile": None, "nested": {"inner": None}}
        load(read_by, tmp_path / "c", target)
        assert_same(target, state, f"{written_by} -> {read_by}")
        assert not marker.exists()
    with dcp_load_keys(written_by, tmp_path / "c", {"blob"}) as only:
        assert_same(only, {"blob": state["blob"]})


class _Touch:
    """A pickle that would create ``path`` when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@dataclass
class RunInfo:
    """A user's own class: stock unpickles it, our safe loading refuses it unless trusted."""

    name: str
    seed: int


@side
def test_plain_objects_load_by_each_sides_rules(tmp_path, side):
    """Builtin containers, scalars, strings, bytes load alike; a user class is stock's to unpickle, ours to refuse."""
    plain = {"step": 7, "lr": 0.5, "name": "run", "tags": ["a", "b"], "cfg": {"seq": 128}, "raw": b"\x01", "none": None}
    dcp.save(plain | {"info": RunInfo("x", 3)}, storage_writer=writer(side, tmp_path / "c"), no_dist=True)
    for read_by in SIDES:
        target = {k: None for k in plain} | {"cfg": {"seq": None}}
        load(read_by, tmp_path / "c", target)
        assert target == plain
    loaded = load("stock", tmp_path / "c", {"info": None})
    assert loaded["info"] == RunInfo("x", 3)
    # Deliberate difference: our reader runs no code from the checkpoint; trust_checkpoint=True is stock's behaviour.
    with pytest.raises(CheckpointException) as caught:
        load("ours", tmp_path / "c", {"info": None})
    error = inner_error(caught)
    assert isinstance(error, UnsafeCheckpointError) and "'info'" in str(error) and "trust_checkpoint=True" in str(error)
    trusted = {"info": None}
    dcp.load(trusted, storage_reader=reader("ours", tmp_path / "c", trust_checkpoint=True), no_dist=True)
    assert trusted["info"] == RunInfo("x", 3)


# -- tensors stock saves that our framing cannot hold


@side
def test_quantized_tensors_round_trip_as_stock_writes_them(tmp_path, side):
    """Per-tensor and per-channel qint8: saved, read by both readers exactly; our record is stock's, byte for byte."""
    state = quantized() | {"plain": torch.arange(6.0)}
    metadata = dcp.save(state, storage_writer=writer(side, tmp_path / side), no_dist=True)
    stock_metadata = dcp.save(state, storage_writer=writer("stock", tmp_path / "ref"), no_dist=True)
    for key in quantized():
        assert _record(tmp_path / side, metadata, key) == _record(tmp_path / "ref", stock_metadata, key)
    for read_by in SIDES:
        target = quantized_targets() | {"plain": torch.zeros(6)}
        load(read_by, tmp_path / side, target)
        assert_same(target, state, f"{side} -> {read_by}")
    # async: stock's staging copy cannot hold a quantized tensor (its copy_ into a fresh one fails); ours saves it
    if side == "stock":
        with pytest.raises(RuntimeError, match="UnknownQuantizer"):
            dcp.async_save(state, storage_writer=writer(side, tmp_path / "async"), no_dist=True)
    else:
        finished(dcp.async_save(state, storage_writer=writer(side, tmp_path / "async"), no_dist=True))
        for read_by in SIDES:
            assert_same(load(read_by, tmp_path / "async", quantized_targets() | {"plain": torch.zeros(6)}), state)


def _record(path: Path, metadata, key: str) -> bytes:
    (info,) = [info for index, info in metadata.storage_data.items() if index.fqn == key]
    return (path / info.relative_path).read_bytes()[info.offset : info.offset + info.length]


# -- DCP's save/load API: empty state, overwrite, writer reuse, partial loads, in-place loads, key order


@side
def test_an_empty_state_dict_saves_and_loads(tmp_path, side):
    dcp.save({}, storage_writer=writer(side, tmp_path / "c"), no_dist=True)
    assert (tmp_path / "c" / ".metadata").is_file()
    for read_by in SIDES:
        assert load(read_by, tmp_path / "c", {}) == {}
    finished(dcp.async_save({}, storage_writer=writer(side, tmp_path / "a"), no_dist=True))
    assert load(side, tmp_path / "a", {}) == {}


@side
def test_overwrite_is_the_default_and_overwrite_false_refuses_in_stocks_words(tmp_path, side):
    path = tmp_path / "c"
    dcp.save({"t": torch.full((4,), 1.0)}, storage_writer=writer(side, path, overwrite=False), no_dist=True)  # new: fine
    dcp.save({"t": torch.full((4,), 2.0)}, storage_writer=writer(side, path), no_dist=True)  # default: replaces
    assert torch.equal(load(side, path, {"t": torch.zeros(4)})["t"], torch.full((4,), 2.0))
    with pytest.raises(CheckpointException, match="Checkpoint already exists"):
        dcp.save({"t": torch.full((4,), 3.0)}, storage_writer=writer(side, path, overwrite=False), no_dist=True)
    for read_by in SIDES:  # the refused save harmed nothing
        assert torch.equal(load(read_by, path, {"t": torch.zeros(4)})["t"], torch.full((4,), 2.0))
    if side == "ours":  # ours: a typed error with the fix, under stock's words
        with pytest.raises(CheckpointException) as caught:
            dcp.save({"t": torch.ones(4)}, storage_writer=writer(side, path, overwrite=False), no_dist=True)
        error = inner_error(caught)
        assert isinstance(error, CheckpointExistsError) and "old checkpoint stays intact" in str(error)


@side
def test_one_writer_serves_many_saves(tmp_path, side):
    """One writer: sync and async saves to a new ``checkpoint_id`` each time, then again and again to its own path."""
    storage = writer(side, tmp_path / "default")
    for i in range(4):
        state = {"t": torch.full((5,), float(i)), "blob": io.BytesIO(bytes([i]) * 3), "step": i}
        target = tmp_path / f"step-{i}"
        if i % 2:
            response = dcp.async_save(state, storage_writer=storage, checkpoint_id=target, no_dist=True)
            staged(response)
            state["t"].add_(100)  # after staging: must not reach the checkpoint
            finished(response)
        else:
            dcp.save(state, storage_writer=storage, checkpoint_id=target, no_dist=True)
    for i in range(4):
        out = load(side, tmp_path / f"step-{i}", {"t": torch.zeros(5), "blob": None, "step": -1})
        assert torch.equal(out["t"], torch.full((5,), float(i))) and out["blob"].getvalue() == bytes([i]) * 3 and out["step"] == i
    storage.reset(tmp_path / "default")  # back to its own path (DCP resets it only when a checkpoint_id is given)
    data_files = lambda: {p.name for p in (tmp_path / "default").glob("*.distcp")}  # noqa: E731
    for i in range(3):
        before = data_files()
        dcp.save({"t": torch.full((5,), 10.0 + i)}, storage_writer=storage, no_dist=True)
        assert torch.equal(load(side, tmp_path / "default", {"t": torch.zeros(5)})["t"], torch.full((5,), 10.0 + i))
        if side == "ours":  # deliberate difference: a new save never writes over the files of the one it replaces
            assert before.isdisjoint(data_files())


class dcp_load_keys:
    """``_load_state_dict_from_keys`` (DCP's load-without-a-target) through the side's reader."""

    def __init__(self, side: str, path: Path, keys: set[str] | None) -> None:
        self.result = _load_state_dict_from_keys(keys, storage_reader=reader(side, path))

    def __enter__(self) -> dict:
        return self.result

    def __exit__(self, *exc: object) -> None:
        return None


@side
def test_partial_loads(tmp_path, side):
    """``allow_partial_load`` skips keys the checkpoint lacks; without it the default planner names the key."""
    state = {"a": torch.arange(4.0), "b": torch.ones(2, 2), "blob": io.BytesIO(b"xyz"), "n": 3}
    dcp.save(state, storage_writer=writer(side, tmp_path / "c"), no_dist=True)
    for read_by in SIDES:
        target = {"a": torch.zeros(4), "new": torch.full((3,), -1.0), "n": 0}
        load(read_by, tmp_path / "c", target, planner=DefaultLoadPlanner(allow_partial_load=True))
        assert torch.equal(target["a"], state["a"]) and target["n"] == 3
        assert torch.equal(target["new"], torch.full((3,), -1.0))  # untouched
        with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict: new"):
            load(read_by, tmp_path / "c", {"a": torch.zeros(4), "new": torch.zeros(3)})
        with dcp_load_keys(read_by, tmp_path / "c", {"b", "blob"}) as only:
            assert_same(only, {"b": state["b"], "blob": state["blob"]})
        with dcp_load_keys(read_by, tmp_path / "c", None) as everything:
            assert_same(everything, state)


@side
def test_loads_are_in_place_whatever_the_key_order(tmp_path, side):
    """Tensors are filled in place (same object, same storage); other values are replaced; key order is free."""
    state = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.tensor([True, False]), "z": torch.arange(3), "o": "obj"}
    dcp.save(state, storage_writer=writer(side, tmp_path / "c"), no_dist=True)
    for read_by in SIDES:
        target = {"o": None, "z": torch.zeros(3, dtype=torch.int64), "x": torch.zeros(2, 3), "y": torch.zeros(2, dtype=torch.bool)}
        before = {k: (v, v.data_ptr()) for k, v in target.items() if isinstance(v, torch.Tensor)}
        load(read_by, tmp_path / "c", target)
        assert_same(target, state)
        assert all(target[k] is t and target[k].data_ptr() == ptr for k, (t, ptr) in before.items())
        assert list(target) == ["o", "z", "x", "y"]


@side
def test_stock_writer_arguments_are_accepted(tmp_path, side):
    """``FileSystemWriter``'s arguments, passed to either writer, give a checkpoint both readers load."""
    state = {"t": torch.arange(10.0), "blob": io.BytesIO(b"q"), "s": "x"}
    kwargs = dict(single_file_per_rank=True, sync_files=False, thread_count=2, per_thread_copy_ahead=1024,
                  cache_staged_state_dict=False, overwrite=True, serialization_format=SerializationFormat.TORCH_SAVE)
    finished(dcp.async_save(state, storage_writer=writer(side, tmp_path / "c", **kwargs), no_dist=True))
    for read_by in SIDES:
        assert_same(load(read_by, tmp_path / "c", {"t": torch.zeros(10), "blob": None, "s": None}), state)


def test_what_stock_arguments_mean_here_and_their_errors(tmp_path):
    mapped = DataStatesWriter(tmp_path, sync_files=False, thread_count=3)
    assert mapped.config.fsync is False and mapped.config.io_threads == 3
    assert DataStatesWriter(tmp_path).config.fsync is True  # unset: the config's own default
    assert DataStatesWriter(tmp_path, DataStatesConfig(fsync=False), sync_files=False).config.fsync is False
    wrong = {
        "single_file_per_rank": (dict(single_file_per_rank=False), "one data file"),
        "sync_files": (dict(sync_files="no"), "must be True or False, got str"),
        "thread_count": (dict(thread_count=0), "greater than or equal to 1"),
        "per_thread_copy_ahead": (dict(per_thread_copy_ahead=1.5), "must be an integer"),
        "cache_staged_state_dict": (dict(cache_staged_state_dict=1), "must be True or False"),
        "serialization_format": (dict(serialization_format=SerializationFormat.SAFETENSORS), "only SerializationFormat.TORCH_SAVE"),
        "_extensions": (dict(_extensions=[object()]), "drop _extensions"),
        "overwrite": (dict(overwrite="yes"), "overwrite must be True or False"),
    }
    for name, (kwargs, fix) in wrong.items():
        with pytest.raises(InvalidOptionError, match=fix) as caught:
            DataStatesWriter(tmp_path, **kwargs)
        assert name in str(caught.value)
    with pytest.raises(InvalidOptionError, match="sync_files=True contradicts config.fsync=False"):
        DataStatesWriter(tmp_path, DataStatesConfig(fsync=False), sync_files=True)
    assert not any(tmp_path.iterdir())  # refused at construction: nothing created


@side
def test_use_collectives_false(tmp_path, side):
    """Stock's experimental uncoordinated save (a rank-local ``__<rank>.metadata``); ours refuses it: no atomic commit."""
    save = lambda: dcp.save({"t": torch.ones(2)}, storage_writer=writer(side, tmp_path / "c"), no_dist=True, use_collectives=False)
    if side == "stock":
        save()
        assert (tmp_path / "c" / "__0.metadata").is_file()
    else:
        with pytest.raises(InvalidOptionError, match="use_collectives=True"):
            save()
        assert not (tmp_path / "c" / ".metadata").exists()


# -- multi-rank: torchrun launches, one per world size, serving every multi-rank scenario


@pytest.fixture(scope="module")
def multirank(tmp_path_factory) -> tuple[Path, str]:
    """2 gloo ranks save (sync, async THREAD and PROCESS, no_dist on rank 0) with each side; 4 ranks reshard and re-save."""
    root = tmp_path_factory.mktemp("conformance")
    out = torchrun_script("conformance.py", "two", str(root), nproc=2)
    out += torchrun_script("conformance.py", "four", str(root), nproc=4)
    return root, out


@pytest.mark.multirank
@side
def test_multirank_saves_reshard_2_to_4_to_1(multirank, side):
    root, out = multirank
    for rank in (0, 1):
        for mode in ("sync", "async_thread", "async_process"):
            assert f"rank {rank}: {side} {mode} 2->2 OK" in out
        assert f"rank {rank}: {side} no_dist OK" in out
    for rank in range(4):
        for mode in ("sync", "async_thread", "async_process"):
            for read_by in SIDES:
                assert f"rank {rank}: {side}/{mode} read by {read_by} 2->4 OK" in out
        assert f"rank {rank}: {side} process_group OK" in out
    # 4 -> 1: one process, plain tensors, both readers
    for read_by in SIDES:
        target = {k: torch.zeros_like(v) for k, v in full_tensors().items()} | quantized_targets()
        target |= {"blob": None, "step": -1}
        load(read_by, root / side / "four", target)
        assert_same(target, full_tensors() | quantized() | {"blob": losses_blob([4.0, 2.0]), "step": 4}, f"{side} -> {read_by} 4->1")
