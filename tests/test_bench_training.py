"""The training-loop benchmark runs every method side by side (a smoke run; numbers go in the README)."""

from __future__ import annotations

import subprocess
import sys


def test_training_benchmark_reports_every_method(tmp_path):
    cmd = [sys.executable, "-m", "dcp_datastates.bench_training", "--dim", "64", "--layers", "1", "--heads", "4",
           "--vocab", "256", "--seq", "16", "--steps", "4", "--every", "2", "--pool", "8MiB", "--chunk", "1MiB", "--dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("  ")[0].strip(): line for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"none", "DataStatesWriter async", "stock async_save + DefaultStager", "stock FileSystemWriter"}
    assert "checkpoint every 2" in done.stdout
    assert list(tmp_path.iterdir()) == []
