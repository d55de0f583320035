"""One rule when ``checkpoint_id`` and the writer's path differ (issue 16.7): ``checkpoint_id`` wins.

As for stock writers (DCP's ``reset(checkpoint_id)``), for ``dcp.save`` and -- decided
when ``dcp.async_save`` is called, before a byte is staged -- for ``dcp.async_save``:
the files are written where they stay, so nothing is renamed across file systems and
the writer's own path is never touched. Before the fix, async_save staged into the
writer's path and ``os.replace``d into ``checkpoint_id`` (EXDEV across file systems,
full-size orphans left behind), and a checkpoint in the writer's path blocked the save.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import small_config
from dcp_datastates import CheckpointPathError, DataStatesReader, DataStatesWriter


@pytest.fixture
def elsewhere(tmp_path):
    """A directory on another file system than tmp_path where there is one (/dev/shm), else beside it."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        path = shm / f"dcp-datastates-test-{uuid.uuid4().hex}"
    else:
        path = tmp_path / "elsewhere"
    yield path / "ckpt"
    shutil.rmtree(path, ignore_errors=True)


def state() -> dict:
    g = torch.Generator().manual_seed(7)
    return {"w": torch.randn(50_000, generator=g), "b": torch.randn(13, generator=g), "step": 9}


def assert_holds_state(path: Path) -> None:
    target = {"w": torch.zeros(50_000), "b": torch.zeros(13), "step": 0}
    dcp.load(target, storage_reader=DataStatesReader(path))
    want = state()
    assert torch.equal(target["w"], want["w"]) and torch.equal(target["b"], want["b"]) and target["step"] == 9


@pytest.mark.parametrize("how", ["save", "async_save"])
def test_checkpoint_id_wins_and_the_writers_path_is_left_alone(tmp_path, elsewhere, how):
    writer_path = tmp_path / "writer"
    writer = DataStatesWriter(writer_path, small_config("threads"))
    if how == "save":
        dcp.save(state(), checkpoint_id=elsewhere, storage_writer=writer)
    else:
        dcp.async_save(state(), checkpoint_id=elsewhere, storage_writer=writer).upload_completion.result()
    assert_holds_state(elsewhere)
    assert not writer_path.exists()  # nothing staged there, nothing orphaned there


@pytest.mark.parametrize("how", ["save", "async_save"])
def test_a_checkpoint_in_the_writers_path_does_not_block_a_save_to_checkpoint_id(tmp_path, elsewhere, how):
    occupied = tmp_path / "occupied"
    dcp.save({"x": torch.ones(3)}, storage_writer=DataStatesWriter(occupied, small_config("threads")))
    before = sorted(p.name for p in occupied.iterdir())
    writer = DataStatesWriter(occupied, small_config("threads"))
    if how == "save":
        dcp.save(state(), checkpoint_id=elsewhere, storage_writer=writer)
    else:
        dcp.async_save(state(), checkpoint_id=elsewhere, storage_writer=writer).upload_completion.result()
    assert_holds_state(elsewhere)
    assert sorted(p.name for p in occupied.iterdir()) == before


def test_a_snapshot_staged_elsewhere_is_refused_not_moved_and_its_files_removed(tmp_path, elsewhere):
    writer_path = tmp_path / "writer"
    writer = DataStatesWriter(writer_path, small_config("threads"))
    writer.stage(state())  # staged by hand (not by dcp.async_save): the snapshot goes to the writer's path
    snapshot = writer._snapshot
    with pytest.raises(CheckpointPathError) as failure:
        dcp.save(state(), checkpoint_id=elsewhere, storage_writer=writer)
    assert str(writer_path) in str(failure.value) and str(elsewhere) in str(failure.value)
    try:
        snapshot.done.result(30)
    except Exception:  # noqa: BLE001 - only its files matter here
        pass
    assert not [p.name for p in writer_path.iterdir() if p.name.startswith("__")]
    assert not (elsewhere / ".metadata").exists()
