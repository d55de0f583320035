"""Atomic commit, overwrite rules, and the errors users meet."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from pydantic import ValidationError
from torch.distributed.checkpoint.api import CheckpointException

from conftest import zeros_like_state
from dcp_datastates import (
    CheckpointIOError,
    CheckpointPathError,
    DataStatesConfig,
    DataStatesLoadPlanner,
    DataStatesReader,
    DataStatesWriter,
    IncompleteCheckpointError,
    MissingKeysError,
)
from dcp_datastates.commit import METADATA_FILE


def save(writer, state):
    dcp.save(state, storage_writer=writer, no_dist=True)


def load(path, state, **kw):
    out = zeros_like_state(state)
    dcp.load(out, storage_reader=DataStatesReader(path), no_dist=True, **kw)
    return out


def test_overwrite_false_refuses_a_complete_checkpoint_in_stock_words(tmp_path, make_writer):
    save(make_writer(tmp_path / "c"), {"x": torch.ones(3)})
    with pytest.raises(CheckpointException, match="(?s)Checkpoint already exists and overwrite=False.*holds a complete checkpoint"):
        save(make_writer(tmp_path / "c", overwrite=False), {"x": torch.zeros(3)})
    assert torch.equal(load(tmp_path / "c", {"x": torch.ones(3)})["x"], torch.ones(3))


def test_overwrite_replaces_and_removes_old_files(tmp_path, make_writer):
    save(make_writer(tmp_path / "c"), {"x": torch.ones(3), "o": "old"})
    old_files = {p.name for p in (tmp_path / "c").iterdir()}
    save(make_writer(tmp_path / "c"), {"x": torch.full((3,), 7.0), "o": "new"})  # overwrite: the default
    new_files = {p.name for p in (tmp_path / "c").iterdir()}
    assert old_files & new_files == {METADATA_FILE}  # old data files gone, nothing else left over
    out = load(tmp_path / "c", {"x": torch.ones(3), "o": "old"})
    assert torch.equal(out["x"], torch.full((3,), 7.0)) and out["o"] == "new"


class ExplodingTensor(torch.Tensor):
    """Stands in for a device fault halfway through a save."""


def test_failed_overwrite_leaves_previous_checkpoint_intact(tmp_path, make_writer, monkeypatch):
    path = tmp_path / "c"
    save(make_writer(path), {"a": torch.arange(5000.0), "b": torch.ones(10)})
    before = sorted(p.name for p in path.iterdir())

    from dcp_datastates import chunk_stream

    calls = {"n": 0}
    real = chunk_stream.ChunkedFileStream.write_tensor

    def fail_on_second(self, flat):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "Input/output error (injected)")
        return real(self, flat)

    monkeypatch.setattr(chunk_stream.ChunkedFileStream, "write_tensor", fail_on_second)
    with pytest.raises(CheckpointException, match="(?s)injected"):
        save(make_writer(path, overwrite=True), {"a": torch.zeros(5000), "b": torch.zeros(10)})
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == before  # partial files removed, old ones untouched
    out = load(path, {"a": torch.zeros(5000), "b": torch.zeros(10)})
    assert torch.equal(out["a"], torch.arange(5000.0)) and torch.equal(out["b"], torch.ones(10))


def test_failed_first_save_leaves_no_metadata(tmp_path, make_writer, monkeypatch):
    from dcp_datastates import chunk_stream

    def boom(self, flat):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(chunk_stream.ChunkedFileStream, "write_tensor", boom)
    with pytest.raises(CheckpointException, match="(?s)No space left"):
        save(make_writer(tmp_path / "c"), {"a": torch.ones(4)})
    assert not (tmp_path / "c" / METADATA_FILE).exists()
    assert [p.name for p in (tmp_path / "c").iterdir()] == []
    with pytest.raises(IncompleteCheckpointError, match="(?s)not a complete checkpoint"):
        DataStatesReader(tmp_path / "c").read_metadata()


def test_commit_fsyncs_data_metadata_and_directory(tmp_path, make_writer, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    save(make_writer(tmp_path / "c"), {"a": torch.ones(4), "o": 1})
    names = [os.path.basename(p) for p in synced]
    assert any(n.endswith("_0.distcp") for n in names) and any(n.endswith("_1.distcp") for n in names)
    assert any(n.startswith(".metadata.") and n.endswith(".tmp") for n in names)
    assert names[-1] == "c"  # the directory, after the rename


def test_path_that_is_a_file(tmp_path, make_writer):
    (tmp_path / "f").write_text("not a dir")
    with pytest.raises(CheckpointException, match="(?s)is a file, not a directory"):
        save(make_writer(tmp_path / "f"), {"a": torch.ones(1)})
    with pytest.raises(CheckpointPathError, match="(?s)is a file"):
        DataStatesReader(tmp_path / "f").read_metadata()


def test_path_under_a_file_cannot_be_created(tmp_path, make_writer):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointException, match="(?s)cannot create checkpoint directory"):
        save(make_writer(tmp_path / "f" / "ckpt"), {"a": torch.ones(1)})


def test_path_not_writable(tmp_path, make_writer, monkeypatch):
    # Tests run as root, for whom permission bits do not bind; fake the access check instead.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(CheckpointException, match="(?s)is not writable by this user"):
        save(make_writer(tmp_path / "ro"), {"a": torch.ones(1)})


def test_missing_directory_and_missing_metadata(tmp_path):
    with pytest.raises(CheckpointPathError, match="(?s)does not exist"):
        DataStatesReader(tmp_path / "nope").read_metadata()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointException, match="(?s)is not a complete checkpoint: it has no .metadata file"):
        dcp.load({"a": torch.ones(1)}, storage_reader=DataStatesReader(tmp_path / "empty"), no_dist=True)


def test_missing_keys_are_all_named(tmp_path, make_writer):
    save(make_writer(tmp_path / "c"), {"a": torch.ones(2)})
    with pytest.raises(CheckpointException, match=r"(?s)2 key\(s\).*'b'.*'c'") as info:
        dcp.load(
            {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(1)},
            storage_reader=DataStatesReader(tmp_path / "c"),
            planner=DataStatesLoadPlanner(),
            no_dist=True,
        )
    assert "allow_partial_load" in str(info.value)
    assert issubclass(MissingKeysError, KeyError)


def test_missing_and_truncated_data_files(tmp_path, make_writer):
    state = {"a": torch.arange(100.0)}
    save(make_writer(tmp_path / "c"), state)
    (data,) = [p for p in (tmp_path / "c").iterdir() if p.name.endswith("_0.distcp")]
    os.truncate(data, data.stat().st_size - 10)
    with pytest.raises(CheckpointException, match=r"(?s)ChecksumMismatchError: __0_\w+_0.distcp is truncated.*'a'"):
        load(tmp_path / "c", state)
    with pytest.raises(CheckpointException, match=r"(?s)CheckpointIOError: 'a'.*truncated"):
        dcp.load({"a": torch.zeros(100)}, storage_reader=DataStatesReader(tmp_path / "c", verify_checksums=False), no_dist=True)
    data.unlink()
    with pytest.raises(CheckpointException, match="(?s)is missing"):
        load(tmp_path / "c", state)
    assert issubclass(CheckpointIOError, OSError)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"io_engine": "spdk"}, r"io_engine\n.*'auto', 'io_uring' or 'threads'"),
        ({"chunk_bytes": -4096}, r"chunk_bytes\n.*positive"),
        ({"chunk_bytes": 5000}, r"chunk_bytes\n.*multiple of 4096"),
        ({"host_pool_bytes": "lots"}, r"host_pool_bytes\n.*size in bytes"),
        ({"chunk_bytes": "64MiB", "host_pool_bytes": "64MiB"}, r"at least 2 \* chunk_bytes"),
        ({"io_threads": 0}, r"io_threads\n.*greater than or equal to 1"),
        ({"fsynk": False}, r"fsynk\n.*Extra inputs are not permitted"),
    ],
)
def test_config_validation_names_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        DataStatesConfig(**fields)


def test_config_accepts_human_sizes():
    config = DataStatesConfig(chunk_bytes="16MiB", host_pool_bytes="1GiB")
    assert config.chunk_bytes == 16 * 2**20 and config.pool_buffers == 64


def test_use_collectives_false_is_refused_clearly(tmp_path):
    writer = DataStatesWriter(tmp_path / "c")
    with pytest.raises(ValueError, match="(?s)use_collectives"):
        writer.set_up_storage_writer(True, rank=0, use_collectives=False)
