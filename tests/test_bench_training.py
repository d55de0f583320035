"""The training-loop benchmark runs every method side by side (a smoke run; numbers go in the README)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: fp32 master weights and moments, as on a GPU
def test_training_benchmark_reports_every_method(tmp_path, dtype):
    # fp32 runs the README's CPU preset, every size overridden but its 2 repeats
    preset = ["--preset", "cpu"] if dtype == "fp32" else ["--repeats", "2"]
    cmd = [sys.executable, "-m", "dcp_datastates.bench_training", *preset, "--dim", "64", "--layers", "1", "--heads", "4",
           "--vocab", "256", "--seq", "16", "--steps", "4", "--every", "2", "--accum", "2", "--dtype", dtype,
           "--chunk", "1MiB", "--dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "median of 2 run(s) each" in done.stdout and "[benchmark wall time" in done.stderr.splitlines()[-1]
    rows = {line.split("  ")[0].strip(): line for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"none", "DataStatesWriter async", "stock async_save + DefaultStager", "stock FileSystemWriter"}
    assert "checkpoint every 2" in done.stdout and f"{dtype} parameters" in done.stdout
    assert list(tmp_path.iterdir()) == []
