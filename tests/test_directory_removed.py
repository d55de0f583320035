"""A commit never publishes a ``.metadata`` whose data files are missing or short (issue 16.5).

The pipeline is held at a known point with an event (no sleeps), the directory or a
file is removed or cut, and the pipeline released: the save must fail with
:class:`CheckpointDirectoryChangedError`, create nothing, and leave the previous
checkpoint as the latest complete one, loading exactly.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from conftest import assert_loads_as, small_config, state_of
from dcp_datastates import DataStatesWriter
from dcp_datastates import chunk_stream, writer as writer_module
from dcp_datastates.commit import METADATA_FILE
from dcp_datastates.errors import CheckpointDirectoryChangedError
from dcp_datastates.resume import latest_complete_checkpoint



def hold_the_sealer(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Stop the first buffer on its way to the engine until ``release`` is set."""
    reached, release = threading.Event(), threading.Event()
    real = chunk_stream.ChunkedFileStream._checksum_and_submit

    def held(self, sealed):
        reached.set()
        release.wait(60)  # never raise here: the sealer must go on (a failing test releases late)
        return real(self, sealed)

    monkeypatch.setattr(chunk_stream.ChunkedFileStream, "_checksum_and_submit", held)
    return reached, release


def expect_directory_changed(excinfo_value: BaseException) -> None:
    text = str(excinfo_value)
    assert "CheckpointDirectoryChangedError" in text or isinstance(excinfo_value, CheckpointDirectoryChangedError)
    assert "removed" in text


@pytest.mark.parametrize("recreate", [False, True], ids=["removed", "removed-and-recreated"])
def test_async_save_into_a_directory_removed_mid_save_fails(tmp_path, engine, monkeypatch, recreate):
    dcp.save(state_of(1.0), storage_writer=DataStatesWriter(tmp_path / "step-1", small_config(engine)), no_dist=True)
    reached, release = hold_the_sealer(monkeypatch)
    target = tmp_path / "step-2"
    response = dcp.async_save(state_of(2.0), storage_writer=DataStatesWriter(target, small_config(engine)), no_dist=True)
    assert reached.wait(60)
    assert any(p.suffix == ".distcp" for p in target.iterdir())  # the save had started writing
    shutil.rmtree(target)
    if recreate:  # e.g. a cleanup script, then a job that mkdirs its output dir
        target.mkdir()
    release.set()
    with pytest.raises(BaseException) as excinfo:
        response.upload_completion.result(timeout=120)
    expect_directory_changed(excinfo.value)
    assert not (target / METADATA_FILE).exists()
    assert target.exists() == recreate  # never created again by the save
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "step-1"
    assert_loads_as(tmp_path / "step-1", 1.0)


def test_sync_save_into_a_directory_removed_mid_save_fails(tmp_path, engine, monkeypatch):
    dcp.save(state_of(1.0), storage_writer=DataStatesWriter(tmp_path / "step-1", small_config(engine)), no_dist=True)
    reached, release = hold_the_sealer(monkeypatch)
    target = tmp_path / "step-2"
    errors: list[BaseException] = []

    def save() -> None:
        try:
            dcp.save(state_of(2.0), storage_writer=DataStatesWriter(target, small_config(engine)), no_dist=True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    saver = threading.Thread(target=save)
    saver.start()
    assert reached.wait(60)
    shutil.rmtree(target)
    release.set()
    saver.join(120)
    assert not saver.is_alive() and len(errors) == 1
    assert isinstance(errors[0], CheckpointException)
    expect_directory_changed(errors[0])
    assert not target.exists()
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "step-1"


@pytest.mark.parametrize("damage", ["delete-data", "truncate-data", "delete-checksums", "replace-directory"])
def test_the_coordinator_refuses_to_commit_over_missing_or_short_files(tmp_path, engine, monkeypatch, damage):
    """Damage done after every rank reported success, right before ``.metadata`` is written."""
    path = tmp_path / "step-2"
    dcp.save(state_of(1.0), storage_writer=DataStatesWriter(path, small_config(engine)), no_dist=True)
    real = writer_module.commit_checkpoint

    def damage_then_commit(identity, metadata, save_tag, **kwargs):
        new = sorted(p for p in path.iterdir() if save_tag in p.name)
        data = [p for p in new if p.suffix == ".distcp"]
        if damage == "delete-data":
            data[0].unlink()
        elif damage == "truncate-data":
            biggest = max(data, key=lambda p: p.stat().st_size)
            os.truncate(biggest, biggest.stat().st_size - 1)
        elif damage == "delete-checksums":
            next(p for p in new if p.name.endswith("checksums.json")).unlink()
        else:  # the whole directory moved aside and an empty one put in its place
            path.rename(tmp_path / "moved")
            path.mkdir()
        return real(identity, metadata, save_tag, **kwargs)

    monkeypatch.setattr(writer_module, "commit_checkpoint", damage_then_commit)
    with pytest.raises(CheckpointException) as excinfo:
        dcp.save(state_of(2.0), storage_writer=DataStatesWriter(path, small_config(engine), overwrite=True), no_dist=True)
    assert "CheckpointDirectoryChangedError" in str(excinfo.value)
    expected = {
        "delete-data": "is missing",
        "truncate-data": "its records need",
        "delete-checksums": "is missing",
        "replace-directory": "removed and created again",
    }[damage]
    assert expected in str(excinfo.value)
    if damage == "replace-directory":
        assert list(path.iterdir()) == []  # nothing was published into the stranger directory
        assert_loads_as(tmp_path / "moved", 1.0)  # the old .metadata still names the old, intact files
    else:
        assert_loads_as(path, 1.0)  # the previous checkpoint in place is untouched
