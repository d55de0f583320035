"""A process never hangs because a save is in flight, and a normal exit finishes it (issue 16.4).

Each case runs a training-like script in a subprocess with a timeout. The script proves
the save is in flight when it exits (``.metadata`` absent at that moment, writes slowed
down) and then leaves by one path: return, ``sys.exit``, an exception. Normal exits must
finish the save, as stock ``async_save`` does; the previous checkpoint always loads exactly.
Interrupts (Ctrl-C, SIGTERM) are tested in ``test_interrupt_under_load.py``.
"""

from __future__ import annotations

import select
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_datastates import DataStatesReader
from dcp_datastates.commit import METADATA_FILE

N = 200_000  # floats per tensor: 4 tensors x 800 KB = ~100 writes of 32 KiB

SCRIPT = textwrap.dedent(
    """
    import os, sys, time, warnings, torch
    import torch.distributed.checkpoint as dcp
    from dcp_datastates import DataStatesConfig, DataStatesWriter
    from dcp_datastates.native import pwrite_engine
    warnings.filterwarnings("ignore")
    root, how, delay, engine = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    config = DataStatesConfig(io_engine=engine, chunk_bytes=32768, host_pool_bytes=4 * 32768)
    def state(v):
        return {f"w{i}": torch.full((N,), v + i) for i in range(4)} | {"step": int(v)}
    dcp.save(state(1.0), storage_writer=DataStatesWriter(f"{root}/step-1", config), no_dist=True)
    real = pwrite_engine.write_fully
    def slow(*a, **k):
        time.sleep(delay)
        return real(*a, **k)
    pwrite_engine.write_fully = slow
    if engine == "io_uring":  # the ring writes on its own: slow down what feeds it
        from dcp_datastates.native import uring_engine
        real_submit = uring_engine.IoUringWriteEngine.submit
        def slow_submit(self, request):
            time.sleep(delay)
            return real_submit(self, request)
        uring_engine.IoUringWriteEngine.submit = slow_submit
    target = f"{root}/step-2"
    f = dcp.async_save(state(2.0), storage_writer=DataStatesWriter(target, config, overwrite=True), no_dist=True)
    if how == "second":
        g = dcp.async_save(state(3.0), storage_writer=DataStatesWriter(f"{root}/step-3", config), no_dist=True)
    time.sleep(0.1)  # into the save
    assert not f.upload_completion.done(), "the save must still be in flight when the script exits"
    print("in flight", flush=True)
    if how in ("return", "second"):
        pass
    elif how == "exit":
        sys.exit(3)
    elif how == "raise":
        raise ValueError("training crashed")
    """
)
SCRIPT = f"N = {N}\n" + SCRIPT


def run_script(tmp_path: Path, how: str, delay: float, engine: str = "threads"):
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path), how, str(delay), engine],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Bounded wait for the script's line: a script that hangs before it must fail the test, not hang it.
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else "(no line within 120 s)"
        if line.strip() != "in flight":
            proc.kill()
            pytest.fail(f"script did not reach its exit point: {line!r}\n{proc.communicate(timeout=60)[1]}")
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def load(path: Path) -> dict:
    out = {f"w{i}": torch.zeros(N) for i in range(4)} | {"step": 0}
    dcp.load(out, storage_reader=DataStatesReader(path), no_dist=True)
    return out


def assert_loads_as(path: Path, value: float) -> None:
    out = load(path)
    assert out["step"] == int(value)
    for i in range(4):
        assert torch.equal(out[f"w{i}"], torch.full((N,), value + i)), (path, i)


@pytest.mark.parametrize(
    "how, returncode, engine",
    [("return", 0, "threads"), ("return", 0, "io_uring"), ("exit", 3, "threads"), ("raise", 1, "threads")],
)
def test_a_normal_exit_finishes_the_in_flight_save(tmp_path, how, returncode, engine):
    code, err = run_script(tmp_path, how, delay=0.03, engine=engine)
    assert code == returncode, err
    assert "cannot schedule new futures" not in err
    assert_loads_as(tmp_path / "step-2", 2.0)  # completed, as stock async_save does
    assert_loads_as(tmp_path / "step-1", 1.0)
    if how == "raise":
        assert "ValueError: training crashed" in err


def test_two_saves_in_flight_at_exit_both_finish(tmp_path):
    code, err = run_script(tmp_path, "second", delay=0.03)
    assert code == 0, err
    assert_loads_as(tmp_path / "step-2", 2.0)
    assert_loads_as(tmp_path / "step-3", 3.0)


# Ctrl-C and SIGTERM with a save in flight: tests/test_interrupt_under_load.py (20 rounds, every kind of save).
