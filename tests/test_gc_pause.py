"""The cyclic collector is paused while a save or load builds its objects, and always given back."""

from __future__ import annotations

import gc
import os
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import dcp_datastates.planner as planner_module
import dcp_datastates.reader as reader_module
import dcp_datastates.writer as writer_module
from dcp_datastates import DataStatesLoadPlanner, DataStatesReader, DataStatesSavePlanner, DataStatesWriter
from dcp_datastates.gc_pause import gc_paused, pauses_open


@pytest.fixture(autouse=True)
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    assert pauses_open() == 0
    (gc.enable if was else gc.disable)()


def test_nested_pauses_restore_the_collector_once() -> None:
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert pauses_open() == 2
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_the_user_turned_off_stays_off() -> None:
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_overlapping_pauses_of_two_threads() -> None:
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with gc_paused():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with gc_paused():
        thread.start()
        assert entered.wait(10)
    assert not gc.isenabled()  # the other thread's pause is still open
    release.set()
    thread.join(10)
    assert gc.isenabled() and pauses_open() == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_pause_has_its_collector() -> None:
    with gc_paused():
        pid = os.fork()
        if pid == 0:  # the child: the collector as it was before the pause, no pause open
            os._exit(0 if gc.isenabled() and pauses_open() == 0 else 1)
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_save_and_load_build_their_objects_with_the_collector_paused(tmp_path, monkeypatch) -> None:
    seen: dict[str, bool] = {}

    def spy(module, name: str) -> None:
        real = getattr(module, name)

        def watched(*args, **kwargs):
            seen[name] = gc.isenabled()
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, watched)

    spy(planner_module, "local_save_plan")
    spy(planner_module, "global_save_plan")
    spy(planner_module, "local_load_plan")
    spy(writer_module, "commit_checkpoint")
    spy(writer_module, "_rename_to_prefix")
    spy(reader_module, "read_checkpoint_metadata")
    spy(reader_module, "plan_reads")
    state = {f"b{i}": torch.full((4,), float(i)) for i in range(50)}
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c"), planner=DataStatesSavePlanner(), no_dist=True)
    assert gc.isenabled()
    target = {k: torch.zeros(4) for k in state}
    dcp.load(target, storage_reader=DataStatesReader(tmp_path / "c"), planner=DataStatesLoadPlanner(), no_dist=True)
    assert gc.isenabled() and all(torch.equal(target[k], v) for k, v in state.items())
    assert seen == dict.fromkeys(["local_save_plan", "global_save_plan", "_rename_to_prefix", "commit_checkpoint",
                                  "read_checkpoint_metadata", "local_load_plan", "plan_reads"], False)


def test_a_failed_save_gives_the_collector_back(tmp_path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        assert not gc.isenabled()  # the failure happens inside a pause
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(writer_module, "commit_checkpoint", refuse)
    with pytest.raises(CheckpointException, match="No space left"):
        dcp.save({"x": torch.ones(2)}, storage_writer=DataStatesWriter(tmp_path / "c"),
                 planner=DataStatesSavePlanner(), no_dist=True)
    assert gc.isenabled() and pauses_open() == 0 and not (tmp_path / "c" / ".metadata").exists()
