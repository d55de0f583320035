"""The README's main example runs, and resume picks the newest *complete* checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from dcp_datastates.resume import latest_complete_checkpoint, list_complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def test_main_example_trains_saves_and_resumes(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_and_resume.py"), "--dir", str(tmp_path), "--steps", "8", "--every", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step-6 at step 6" in proc.stdout
    assert proc.stdout.count("identical to the uninterrupted run") == 3 and proc.stdout.rstrip().endswith("OK")


def test_latest_complete_checkpoint_skips_incomplete_ones(tmp_path, make_writer):
    for step in (5, 10):
        dcp.save({"w": torch.full((2,), float(step))}, storage_writer=make_writer(tmp_path / f"step-{step}"), no_dist=True)
    (tmp_path / "step-15").mkdir()  # a save that died before its commit
    (tmp_path / "step-15" / "__0_abc_0.distcp").write_bytes(b"partial")
    assert [p.name for p in list_complete_checkpoints(tmp_path)] == ["step-5", "step-10"]
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "step-10"
    assert latest_complete_checkpoint(tmp_path / "missing") is None
