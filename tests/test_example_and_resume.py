"""The README's main example runs, and resume picks the newest *complete* checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch
import torch.distributed.checkpoint as dcp

from dcp_datastates.errors import CheckpointPathError
from dcp_datastates.resume import latest_complete_checkpoint, list_complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_and_resume.py"


def run_example(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300, env=env)


def test_main_example_trains_saves_and_resumes(tmp_path):
    target = tmp_path / "new" / "run"  # created, parents too
    proc = run_example("--dir", str(target), "--steps", "8", "--every", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step-6 at step 6" in proc.stdout
    assert proc.stdout.count("identical to the uninterrupted run") == 3
    assert proc.stdout.rstrip().splitlines()[-1].startswith("OK (checkpoints kept in")
    assert sorted(p.name for p in target.iterdir()) == ["step-3", "step-6"]


def test_main_example_without_dir_uses_a_fresh_directory_of_its_own(tmp_path):
    """The README's command: no --dir. It must not reuse (or wipe) a fixed path."""
    (tmp_path / "dcp_datastates_example").mkdir()  # the old fixed default, with someone's file in it
    (tmp_path / "dcp_datastates_example" / "notes.txt").write_text("mine")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = run_example("--steps", "4", "--every", "2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    made = [p for p in tmp_path.iterdir() if p.name.startswith("dcp_datastates_example_")]
    assert len(made) == 1 and f"checkpoints go to {made[0]}" in proc.stdout
    assert sorted(p.name for p in made[0].iterdir()) == ["step-2", "step-4"]
    assert (tmp_path / "dcp_datastates_example" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("held", [["notes.txt"], ["step-4/"], ["a.txt", "b/", "c.txt", "d.txt", "e.txt", "f.txt"]])
def test_main_example_refuses_a_directory_that_holds_files_and_deletes_nothing(tmp_path, held):
    for name in held:
        if name.endswith("/"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "inner.bin").write_bytes(b"\x00\x01")
        else:
            (tmp_path / name).write_text(f"user data {name}")
    before = sorted((str(p.relative_to(tmp_path)), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    proc = run_example("--dir", str(tmp_path), "--steps", "4", "--every", "2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"--dir {str(tmp_path)!r} is not empty" in proc.stderr and "never deletes files" in proc.stderr
    assert held[0].rstrip("/") in proc.stderr and ("and 1 more" in proc.stderr) == (len(held) > 5)
    assert "step " not in proc.stdout  # refused before training or saving
    after = sorted((str(p.relative_to(tmp_path)), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    assert after == before


def test_main_example_refuses_a_file_as_dir(tmp_path):
    target = tmp_path / "ckpts"
    target.write_text("not a directory")
    proc = run_example("--dir", str(target))
    assert proc.returncode == 2 and "is a file" in proc.stderr, proc.stderr
    assert target.read_text() == "not a directory"


def test_latest_complete_checkpoint_skips_incomplete_ones(tmp_path, make_writer):
    for step in (5, 10):
        dcp.save({"w": torch.full((2,), float(step))}, storage_writer=make_writer(tmp_path / f"step-{step}"), no_dist=True)
    (tmp_path / "step-15").mkdir()  # a save that died before its commit
    (tmp_path / "step-15" / "__0_abc_0.distcp").write_bytes(b"partial")
    assert [p.name for p in list_complete_checkpoints(tmp_path)] == ["step-5", "step-10"]
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "step-10"
    with pytest.raises(CheckpointPathError, match="does not exist"):  # a typo in the root is not "no checkpoint yet"
        latest_complete_checkpoint(tmp_path / "missing")
