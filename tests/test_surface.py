"""The user's surface: the resume idiom on the first run, early configuration errors, a cheap import, an instant CLI.

Timings are bounded generously (best of 2 or 3, and relative to torch's own import where torch is
needed) so that they hold on a loaded 2-core machine.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_datastates import (
    CheckpointPathError,
    DataStatesConfig,
    DataStatesReader,
    DataStatesWriter,
    IncompleteCheckpointError,
)
from dcp_datastates.metadata_check import read_checkpoint_metadata
from dcp_datastates.native import engine as engine_module
from dcp_datastates.native import uring_ring
from dcp_datastates.resume import latest_complete_checkpoint

CLI = [sys.executable, "-m", "dcp_datastates"]


def save(path: Path, value: float, config: DataStatesConfig | None = None) -> None:
    dcp.save({"w": torch.full((4,), value), "step": int(value)},
             storage_writer=DataStatesWriter(path, config or DataStatesConfig(io_engine="threads")), no_dist=True)


# -- resume ---------------------------------------------------------------------------------------
def test_resume_idiom_starts_fresh_on_the_first_run_and_resumes_after(tmp_path):
    root = tmp_path / "ckpt"
    with pytest.raises(CheckpointPathError, match="does not exist. Create it before the first run"):
        latest_complete_checkpoint(root)  # a typo in the root must not read as "start from scratch"
    root.mkdir()
    assert latest_complete_checkpoint(root) is None  # first run: start fresh
    with pytest.raises(CheckpointPathError, match="path is None.*start fresh"):
        DataStatesReader(latest_complete_checkpoint(root))
    with pytest.raises(CheckpointPathError, match="is a file"):
        latest_complete_checkpoint(Path(__file__))
    save(root / "step-100", 100.0)
    save(root / "step-200", 200.0)
    (root / "step-300").mkdir()  # a save that died before its commit
    latest = latest_complete_checkpoint(root)
    assert latest == root / "step-200"
    out = {"w": torch.zeros(4), "step": 0}
    dcp.load(out, storage_reader=DataStatesReader(latest), no_dist=True)
    assert out["step"] == 200 and torch.equal(out["w"], torch.full((4,), 200.0))


def test_a_reader_given_the_root_names_its_checkpoints_and_the_newest_complete_one(tmp_path):
    for step in (1, 2, 3, 10, 20, 30, 40):
        save(tmp_path / f"step-{step}", float(step))
    shutil.rmtree(tmp_path / "step-40")
    (tmp_path / "step-40").mkdir()  # incomplete: the newest complete one is step-30
    with pytest.raises(IncompleteCheckpointError) as caught:
        read_checkpoint_metadata(tmp_path, trust=False)
    message = str(caught.value)
    assert "is a checkpoint root, not a checkpoint: it holds step-1, step-2, ..., step-20, step-30, step-40 (7 in all)" in message
    assert f"(newest complete: step-30). Pass {str(tmp_path / 'step-30')!r}" in message
    empty = tmp_path / "empty"
    (empty / "step-5").mkdir(parents=True)
    with pytest.raises(IncompleteCheckpointError, match="holds step-5, none of them complete"):
        read_checkpoint_metadata(empty, trust=False)
    with pytest.raises(IncompleteCheckpointError, match="has no .metadata file"):  # not a root: the plain message
        read_checkpoint_metadata(empty / "step-5", trust=False)


# -- configuration --------------------------------------------------------------------------------
def test_io_uring_that_cannot_work_is_refused_when_the_config_is_built(monkeypatch):
    monkeypatch.setattr(uring_ring, "_problem", ["io_uring_queue_init failed: [Errno 1] Operation not permitted"])
    with pytest.raises(ValueError) as caught:  # pydantic's ValidationError
        DataStatesConfig(io_engine="io_uring")
    message = str(caught.value)
    assert "io_engine" in message and "Operation not permitted" in message
    assert "io_engine='auto' or 'threads'" in message and "pip install liburing==2024.5.3" in message
    with pytest.raises(ValueError, match="io_uring cannot be used here"):
        DataStatesWriter("/tmp/never-created", {"io_engine": "io_uring"})
    assert DataStatesConfig(io_engine="auto").io_engine == "auto"  # auto and threads stay usable
    assert not Path("/tmp/never-created").exists()


def test_the_io_uring_probe_is_cached_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(uring_ring, "_problem", [])
    monkeypatch.setattr(uring_ring, "_probe", lambda: calls.append(1) or None)
    for _ in range(3):
        DataStatesConfig(io_engine="io_uring")
    assert calls == [1]


def test_the_engine_fallback_is_logged_once_per_process(tmp_path, monkeypatch, caplog):
    def refused() -> None:
        raise engine_module.EngineUnavailable("io_uring_queue_init failed: [Errno 38] Function not implemented")

    monkeypatch.setattr(engine_module, "_logged", set())
    with caplog.at_level(logging.INFO, logger="dcp_datastates"):
        for i in range(3):
            made = engine_module.choose_engine("auto", refused, lambda: "threads-engine", "writing")
            assert made == "threads-engine"
    lines = [r.getMessage() for r in caplog.records if "io_uring unavailable" in r.getMessage()]
    assert len(lines) == 1 and "Function not implemented" in lines[0], lines


# -- import and CLI ---------------------------------------------------------------------------------
def best_of(cmd: list[str], runs: int = 3) -> tuple[float, subprocess.CompletedProcess]:
    best, proc = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        best = min(best, time.perf_counter() - start)
    return best, proc


def test_import_is_cheap_and_every_public_name_still_works():
    code = (
        "import sys, dcp_datastates as d\n"
        "assert 'torch' not in sys.modules and 'numba' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n"
        "assert {'DataStatesWriter', 'unwrap_errors', 'latest_complete_checkpoint'} <= set(dir(d))\n"
        "from dcp_datastates import DataStatesWriter, DataStatesReader, DataStatesConfig, wait_staged\n"
        "assert DataStatesWriter.__module__ == 'dcp_datastates.writer'\n"
        "assert all(getattr(d, name) is not None for name in d.__all__)\n"
        "import torch.optim.optimizer as o\n"
        "assert any(getattr(h, '__module__', '') == 'dcp_datastates.step_guard' for h in o._global_optimizer_pre_hooks.values())\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr
    # with torch imported first (a training program) the step guard is registered at once
    code = ("import torch, torch.optim.optimizer as o, dcp_datastates\n"
            "print(any(getattr(h, '__module__', '') == 'dcp_datastates.step_guard' for h in o._global_optimizer_pre_hooks.values()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr


def test_version_and_help_answer_within_half_a_second():
    for args in (["--version"], ["--help"]):
        seconds, proc = best_of([*CLI, *args])
        assert proc.returncode == 0 and ("dcp-datastates" in proc.stdout), proc.stderr
        assert seconds < 0.5, (args, seconds)


def test_inspect_costs_little_more_than_importing_torch_and_a_closed_pipe_ends_it_quietly(tmp_path):
    path = tmp_path / "step-1"
    keys = [f"model.layers.{i}.self_attention.query_projection.weight" for i in range(900)]  # > 64 KiB of table
    dcp.save({key: torch.zeros(2) for key in keys}, storage_writer=DataStatesWriter(path, DataStatesConfig(io_engine="threads")),
             no_dist=True)
    small = tmp_path / "small"
    save(small, 3.0)
    baseline, _ = best_of([sys.executable, "-c", "import torch.distributed.checkpoint"], runs=2)
    seconds, proc = best_of([*CLI, "inspect", str(small)], runs=2)
    assert proc.returncode == 0 and "total: 2 keys" in proc.stdout, proc.stdout + proc.stderr
    # torch's import is the floor (unpickling .metadata needs its classes): < 3 s where it takes 2 s
    assert seconds < 1.5 * baseline + 0.5, (seconds, baseline)
    proc = subprocess.run([*CLI, "inspect", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and keys[-1] in proc.stdout and len(proc.stdout) > 65536, proc.stderr  # a pipe holds 64 KiB
    # `inspect ... | head -1`: the reader goes away after one line of 900
    reader = subprocess.Popen([*CLI, "inspect", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = reader.stdout.readline()
    reader.stdout.close()
    err = reader.stderr.read()
    code = reader.wait(timeout=120)
    assert first.startswith(b"checkpoint ") and err == b"" and code in (0, 141), (code, err)
