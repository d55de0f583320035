"""examples/train_fsdp.py under torchrun: killed mid-save, resumed, loss curve identical; 2 -> 1 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcp_datastates.resume import list_complete_checkpoints

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_fsdp.py"
pytestmark = pytest.mark.multirank


def run(directory: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(EXAMPLE),
           "--dir", str(directory), *args]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)


def losses(directory: Path) -> dict[int, tuple[float, int]]:
    """Last logged loss per step (a resumed run overwrites the steps it repeats)."""
    out = {}
    for line in (directory / "losses.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out[entry["step"]] = (entry["loss"], entry["world"])
    return out


def test_killed_mid_save_then_resumed_continues_the_loss_curve_exactly(tmp_path):
    reference = run(tmp_path / "ref", 2, "--steps", "12", "--every", "3", "--keep", "2")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert [p.name for p in list_complete_checkpoints(tmp_path / "ref" / "checkpoints")] == ["step-9", "step-12"]

    # rank 0 prints a line per step, the checkpoints it starts and commits, and the end
    assert [line.split()[1] for line in reference.stdout.splitlines() if line.startswith("step ")] == [
        f"{s}/12" for s in range(1, 13)]
    assert f"step    3/12  loss {losses(tmp_path / 'ref')[3][0]:.4f}  checkpoint step-3 started (async)" in reference.stdout
    assert reference.stdout.count("committed") == 4 and "checkpoint step-12 committed" in reference.stdout
    assert "complete checkpoints: ['step-9', 'step-12']" in reference.stdout

    killed = run(tmp_path / "crash", 2, "--steps", "12", "--every", "3", "--kill-at", "6")
    # every rank exits with status 17 in the middle of the step-6 save, saying so, without a gloo traceback
    assert killed.returncode != 0
    assert "simulated crash at step 6 (--kill-at 6)" in killed.stdout, killed.stdout
    assert "step    7/12" not in killed.stdout and killed.stdout.count("simulated crash") == 1
    assert "exitcode  : 17" in killed.stderr and "gloo" not in killed.stderr.lower(), killed.stderr[-3000:]
    assert [p.name for p in list_complete_checkpoints(tmp_path / "crash" / "checkpoints")] == ["step-3"]
    half = tmp_path / "crash" / "checkpoints" / "step-6"
    assert half.is_dir() and not (half / ".metadata").exists()  # the save had started; it never committed
    resumed = run(tmp_path / "crash", 2, "--steps", "12", "--every", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 3 on 2 ranks" in resumed.stdout
    expected, got = losses(tmp_path / "ref"), losses(tmp_path / "crash")
    assert sorted(got) == list(range(1, 13))
    for step in range(4, 13):
        assert got[step] == expected[step], (step, got[step], expected[step])


def test_resume_on_fewer_ranks(tmp_path):
    first = run(tmp_path, 2, "--steps", "6", "--every", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(tmp_path, 1, "--steps", "9", "--every", "3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 6 on 1 rank" in second.stdout
    logged = losses(tmp_path)
    assert [logged[s][1] for s in range(1, 10)] == [2] * 6 + [1] * 3
    assert [p.name for p in list_complete_checkpoints(tmp_path / "checkpoints")] == ["step-6", "step-9"]


@pytest.mark.parametrize(("args", "message"), [
    (["--every", "3", "--kill-at", "5"], "--kill-at 5 would never fire: it must be a step that saves, a multiple of --every 3"),
    (["--every", "0"], "--every and --keep must be at least 1"),
])
def test_arguments_that_would_do_nothing_or_crash_are_refused_before_anything_runs(tmp_path, args, message):
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--dir", str(tmp_path / "run"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
