"""Crash safety of the commit (issue 17.1): a failure at any step leaves the old or the new checkpoint.

An overwrite of a complete checkpoint is interrupted at each step of ``commit.py``'s
protocol -- before the temp ``.metadata``, after it, after the rename, at the directory
fsync, before and during stale-file removal -- once by killing the process there
(``os._exit``: no cleanup runs, as in a crash) and once by an I/O error raised there.
Afterwards the directory loads *exactly* as the previous checkpoint (failure before the
rename) or the new one (after it), with our reader (checksums verified) and with stock
``FileSystemReader``; never neither, and never a ``.metadata`` over missing files.
A fresh save interrupted before the rename leaves no ``.metadata`` at all.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from conftest import small_config
from dcp_datastates import DataStatesReader, DataStatesWriter
from dcp_datastates import commit
from dcp_datastates.commit import METADATA_FILE

N = 6_000
#: Each step, and which checkpoint must load when the commit dies there.
STEPS = {
    "before-temp-metadata": "old",
    "after-temp-metadata": "old",
    "after-rename": "new",
    "directory-fsync": "new",
    "before-stale-removal": "new",
    "during-stale-removal": "new",
}


def state_of(value: float) -> dict:
    return {
        "a": torch.full((N,), value),
        "b": torch.arange(N, dtype=torch.float64) * value,
        "nested": {"step": int(value), "name": f"run-{value}"},
    }


def blank() -> dict:
    return {"a": torch.zeros(N), "b": torch.zeros(N, dtype=torch.float64), "nested": {"step": 0, "name": ""}}


def load_value(path: Path, reader) -> float:
    """Load ``path`` and return which state it holds -- failing unless it is exactly one of them."""
    out = blank()
    dcp.load(out, storage_reader=reader(path), no_dist=True)
    value = float(out["nested"]["step"])
    expected = state_of(value)
    assert torch.equal(out["a"], expected["a"]) and torch.equal(out["b"], expected["b"])
    assert out["nested"] == expected["nested"]
    return value


def assert_holds(path: Path, which: str) -> None:
    value = {"old": 1.0, "new": 2.0}[which]
    assert load_value(path, DataStatesReader) == value
    assert load_value(path, FileSystemReader) == value
    referenced = {p.name for p in path.iterdir()}
    assert METADATA_FILE in referenced


def inject(step: str, fail) -> None:
    """Patch ``commit``'s step functions so that ``fail()`` runs at ``step``."""
    real_write, real_publish = commit.write_temp_metadata, commit.publish
    real_fsync_dir, real_remove = commit.fsync_directory, commit.remove_stale_files

    def write_temp_metadata(*args, **kwargs):
        if step == "before-temp-metadata":
            fail()
        real_write(*args, **kwargs)
        if step == "after-temp-metadata":
            fail()

    def publish(*args, **kwargs):
        real_publish(*args, **kwargs)
        if step == "after-rename":
            fail()

    def fsync_directory(*args, **kwargs):
        if step == "directory-fsync":
            fail()
        real_fsync_dir(*args, **kwargs)

    def remove_stale_files(dir_fd, keep):
        if step == "before-stale-removal":
            fail()
        if step != "during-stale-removal":
            return real_remove(dir_fd, keep)
        real_unlink, calls = commit.os.unlink, []

        def unlink(*args, **kwargs):  # dies after the first file is gone
            calls.append(args)
            if len(calls) == 2:
                fail()
            real_unlink(*args, **kwargs)

        commit.os.unlink = unlink
        try:
            return real_remove(dir_fd, keep)
        finally:
            commit.os.unlink = real_unlink

    commit.write_temp_metadata, commit.publish = write_temp_metadata, publish
    commit.fsync_directory, commit.remove_stale_files = fsync_directory, remove_stale_files


CRASH = textwrap.dedent(
    """
    # One process per engine imports everything once, then forks a child per step: each
    # child saves, then overwrites and dies at its step. Nothing has started a thread
    # before the forks (no save ran here), so each child starts its own.
    import json, os, sys, warnings
    sys.path.insert(0, sys.argv[3])
    warnings.filterwarnings("ignore")
    import torch.distributed.checkpoint as dcp
    from conftest import small_config
    from test_commit_crash import inject, state_of
    from dcp_datastates import DataStatesWriter
    root, engine, steps = sys.argv[1], sys.argv[2], sys.argv[4:]
    codes = {}
    for case in steps:
        path = os.path.join(root, case.replace(":", "-"))
        pid = os.fork()
        if pid == 0:
            try:
                fresh = case.startswith("fresh:")
                step = case.removeprefix("fresh:")
                if not fresh:
                    dcp.save(state_of(1.0), storage_writer=DataStatesWriter(path, small_config(engine)), no_dist=True)
                inject(step, lambda: os._exit(17))
                dcp.save(state_of(2.0), storage_writer=DataStatesWriter(path, small_config(engine), overwrite=True), no_dist=True)
                os._exit(0)  # the step was never reached: the test fails on the exit code
            except BaseException as exc:
                print(repr(exc), file=sys.stderr, flush=True)
                os._exit(1)
        codes[case] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print(json.dumps(codes), flush=True)
    """
)
CASES = list(STEPS) + ["fresh:before-temp-metadata", "fresh:after-temp-metadata"]


@pytest.fixture(scope="module", params=["threads", "io_uring"])
def crashed(request, tmp_path_factory) -> tuple[str, Path, dict[str, int]]:
    """Run every crash case for one engine; return the engine, the root, and each child's exit code."""
    root = tmp_path_factory.mktemp(f"crash-{request.param}")
    tests_dir = str(Path(__file__).resolve().parent)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, str(root), request.param, tests_dir, *CASES],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return request.param, root, json.loads(proc.stdout.strip().splitlines()[-1])


def assert_no_leftovers_after_next_overwrite(path: Path, engine: str) -> None:
    """The next save cleans what the crash left (temp metadata, orphaned data files)."""
    dcp.save(state_of(3.0), storage_writer=DataStatesWriter(path, small_config(engine), overwrite=True), no_dist=True)
    assert load_value(path, DataStatesReader) == 3.0
    names = {p.name for p in path.iterdir()}
    assert not any(name.endswith(".tmp") for name in names)
    assert len({name.split("_")[3] for name in names if name.startswith("__")}) == 1, names  # one save tag


@pytest.mark.parametrize("step", list(STEPS))
def test_a_crash_at_each_commit_step_leaves_the_old_or_the_new_checkpoint(crashed, step):
    engine, root, codes = crashed
    assert codes[step] == 17  # died exactly at the injected step
    path = root / step
    assert_holds(path, STEPS[step])
    assert_no_leftovers_after_next_overwrite(path, engine)


@pytest.mark.parametrize("step", ["before-temp-metadata", "after-temp-metadata"])
def test_a_fresh_save_that_crashes_before_the_rename_does_not_look_complete(crashed, step):
    _, root, codes = crashed
    assert codes[f"fresh:{step}"] == 17
    assert not (root / f"fresh-{step}" / METADATA_FILE).exists()


@pytest.mark.parametrize("step", list(STEPS))
def test_an_io_error_at_each_commit_step_leaves_the_old_or_the_new_checkpoint(tmp_path, engine, step, monkeypatch):
    path = tmp_path / "ckpt"
    dcp.save(state_of(1.0), storage_writer=DataStatesWriter(path, small_config(engine)), no_dist=True)
    for name in ("write_temp_metadata", "publish", "fsync_directory", "remove_stale_files"):
        monkeypatch.setattr(commit, name, getattr(commit, name))  # restored after the test
    monkeypatch.setattr(commit.os, "unlink", commit.os.unlink)

    def fail():
        raise OSError(errno.EIO, "Input/output error (injected)")

    inject(step, fail)
    writer = DataStatesWriter(path, small_config(engine), overwrite=True)
    if STEPS[step] == "old":  # nothing published: the save fails, and says so
        with pytest.raises(CheckpointException, match="injected"):
            dcp.save(state_of(2.0), storage_writer=writer, no_dist=True)
        assert not any(p.name.endswith(".tmp") for p in path.iterdir())  # the temp file was removed
    elif step == "directory-fsync":  # published, but not durable: the caller must hear it
        with pytest.raises(CheckpointException, match="(?s)CheckpointIOError.*published.*may not survive"):
            dcp.save(state_of(2.0), storage_writer=writer, no_dist=True)
    elif step == "after-rename":
        with pytest.raises(CheckpointException, match="injected"):
            dcp.save(state_of(2.0), storage_writer=writer, no_dist=True)
    else:  # stale-file removal: the checkpoint is committed; leftovers are only logged
        dcp.save(state_of(2.0), storage_writer=writer, no_dist=True)
    assert_holds(path, STEPS[step])
    monkeypatch.undo()
    assert_no_leftovers_after_next_overwrite(path, engine)
