"""Our failures can be caught by type: ``unwrap_errors()`` / ``unwrap()`` around DCP's calls.

``dcp.save``/``dcp.load`` and the upload future of ``async_save`` wrap a storage error in torch's
``CheckpointException`` (a ``BaseException``: ``except Exception`` misses it); ``async_save``'s
staging raises ours directly. Inside ``unwrap_errors()`` every entry point raises the same class,
the very error the failing rank raised, with the ``CheckpointException`` as ``__cause__``; what
is not ours passes through unchanged. One torchrun launch covers the multi-rank case where only
rank 1 fails.
"""

from __future__ import annotations

import json
import traceback

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from conftest import torchrun_script
from dcp_datastates import (
    CheckpointPathError,
    DataStatesError,
    DataStatesLoadPlanner,
    DataStatesReader,
    DataStatesWriter,
    IncompleteCheckpointError,
    MissingKeysError,
    unwrap,
    unwrap_errors,
)

STATE = {"w": torch.arange(6.0), "step": 4}


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


def test_dcp_save_raises_our_class_inside_unwrap_errors_and_checkpoint_exception_outside(a_file):
    with pytest.raises(BaseException) as raw:
        dcp.save(STATE, storage_writer=DataStatesWriter(a_file), no_dist=True)
    assert type(raw.value) is CheckpointException and not isinstance(raw.value, Exception)  # the problem
    with pytest.raises(CheckpointPathError, match="is a file") as caught:
        with unwrap_errors():
            dcp.save(STATE, storage_writer=DataStatesWriter(a_file), no_dist=True)
    assert type(caught.value.__cause__) is CheckpointException
    assert caught.value.failed_rank == 0 and list(caught.value.rank_failures) == [0]
    assert caught.value.rank_failures[0] is caught.value
    assert a_file.read_text() == "not a directory"


def test_async_save_raises_the_same_class_from_staging_and_from_the_upload(a_file):
    with pytest.raises(CheckpointPathError, match="is a file"):  # stage(): raised directly, passes through
        with unwrap_errors():
            dcp.async_save(STATE, storage_writer=DataStatesWriter(a_file), no_dist=True)
    # With DCP's own stager our writer first sees the path on the upload thread: wrapped there.
    response = dcp.async_save(STATE, storage_writer=DataStatesWriter(a_file), async_stager=DefaultStager(StagingOptions(False, False, False, False)), no_dist=True)
    with pytest.raises(BaseException) as raw:
        getattr(response, "upload_completion", response).result()  # the legacy Future with a non-async stager
    assert type(raw.value) is CheckpointException
    with pytest.raises(CheckpointPathError, match="is a file") as caught:
        with unwrap_errors():
            getattr(response, "upload_completion", response).result()  # the legacy Future with a non-async stager
    assert caught.value.__cause__ is raw.value


def test_dcp_load_raises_our_class_missing_keys_and_a_checkpoint_root(tmp_path):
    dcp.save(STATE, storage_writer=DataStatesWriter(tmp_path / "step-3"), no_dist=True)
    out = {"w": torch.zeros(6), "step": 0, "extra": torch.zeros(1)}
    with pytest.raises(MissingKeysError, match="extra"):
        with unwrap_errors():
            dcp.load(out, storage_reader=DataStatesReader(tmp_path / "step-3"), planner=DataStatesLoadPlanner(), no_dist=True)
    del out["extra"]
    with pytest.raises(IncompleteCheckpointError, match="checkpoint root") as caught:
        with unwrap_errors():
            dcp.load(out, storage_reader=DataStatesReader(tmp_path), no_dist=True)
    assert f"holds step-3 (newest complete: step-3). Pass {str(tmp_path / 'step-3')!r}" in str(caught.value)
    with unwrap_errors():  # and nothing to unwrap when all is well
        dcp.load(out, storage_reader=DataStatesReader(tmp_path / "step-3"), no_dist=True)
    assert torch.equal(out["w"], STATE["w"]) and out["step"] == 4


def test_failures_that_are_not_ours_pass_through_unchanged(tmp_path, a_file):
    with pytest.raises(BaseException) as raw:
        with unwrap_errors():
            dcp.save(STATE, storage_writer=FileSystemWriter(a_file), no_dist=True)  # stock writer: not ours
    assert type(raw.value) is CheckpointException and not any(
        isinstance(e, DataStatesError) for e, _ in raw.value.failures.values())
    assert unwrap(raw.value) is raw.value
    with pytest.raises(ZeroDivisionError):
        with unwrap_errors():
            1 / 0


def test_unwrap_prefers_ctrl_c_then_the_lowest_rank_of_ours():
    def wrapped(exc: BaseException):
        try:
            raise exc
        except BaseException as raised:  # noqa: BLE001 - a traceback, as DCP keeps one
            return _wrap_exception(raised)

    ours1, ours3, other = CheckpointPathError("rank 1's"), MissingKeysError("rank 3's"), ValueError("rank 0's")
    mixed = CheckpointException("write", {3: wrapped(ours3), 0: wrapped(other), 1: wrapped(ours1)})
    chosen = unwrap(mixed)
    assert chosen is ours1 and chosen.failed_rank == 1
    assert chosen.rank_failures == {0: other, 1: ours1, 3: ours3}
    interrupted = KeyboardInterrupt()
    assert unwrap(CheckpointException("write", {1: wrapped(ours1), 2: wrapped(interrupted)})) is interrupted
    # a rank's error received over the wire has no traceback of its own: DCP's summary becomes a note
    remote = MissingKeysError("remote")
    summary = traceback.StackSummary.from_list([("train.py", 7, "step", "dcp.load(...)")])
    assert unwrap(CheckpointException("plan", {1: (remote, summary)})) is remote
    assert "raised on rank 1" in "".join(getattr(remote, "__notes__", [])) and "train.py" in remote.__notes__[0]


def test_only_rank_1_fails_and_both_ranks_catch_its_typed_error(tmp_path):
    out = torchrun_script("unwrap_errors.py", str(tmp_path))
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in out.splitlines() if "RESULT " in line]
    assert len(results) == 6, out
    expected = {"save": "CheckpointPathError", "async_upload": "CheckpointPathError", "load": "MissingKeysError"}
    for r in results:
        assert r["raw"] == "CheckpointException" and r["raw_is_exception"] is False, r
        assert r["error"] == expected[r["case"]] and r["cause"] == "CheckpointException", r
        assert r["failed_rank"] == 1 and r["failed_ranks"] == [1], r
    assert {(r["case"], r["rank"]) for r in results} == {(c, k) for c in expected for k in (0, 1)}
