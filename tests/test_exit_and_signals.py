"""A process never hangs because a save is in flight (issue 16.4).

Each case runs a training-like script in a subprocess with a timeout. The script proves
the save is in flight when it exits (``.metadata`` absent at that moment, writes slowed
down) and then leaves by one path: return, ``sys.exit``, an exception, Ctrl-C, SIGTERM.
Normal exits must finish the save, as stock ``async_save`` does; Ctrl-C and SIGTERM must
end the process promptly. Afterwards the directory either loads exactly or has no
``.metadata``, and the previous checkpoint always loads exactly.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_datastates import DataStatesReader
from dcp_datastates.commit import METADATA_FILE

N = 200_000  # floats per tensor: 4 tensors x 800 KB = ~100 writes of 32 KiB
#: Exit bound for Ctrl-C / SIGTERM. The slowed save alone takes > 4x longer (asserted in-script).
PROMPT_S = 20.0

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
    target = f"{root}/step-1" if how in ("sigint", "sigint-waiting") else f"{root}/step-2"
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
    elif how in ("sigint", "sigterm"):
        time.sleep(600)  # the parent signals while "training" runs
    elif how == "sigint-waiting":
        f.upload_completion.result()  # the parent signals while the script waits for the save
    """
)
SCRIPT = f"N = {N}\n" + SCRIPT


def run_script(tmp_path: Path, how: str, delay: float, engine: str = "threads", signum: int | None = None):
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
        start = time.monotonic()
        if signum is not None:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, elapsed, err


def load(path: Path) -> dict:
    out = {f"w{i}": torch.zeros(N) for i in range(4)} | {"step": 0}
    dcp.load(out, storage_reader=DataStatesReader(path), no_dist=True)
    return out


def assert_loads_as(path: Path, value: float) -> None:
    out = load(path)
    assert out["step"] == int(value)
    for i in range(4):
        assert torch.equal(out[f"w{i}"], torch.full((N,), value + i)), (path, i)


def assert_complete_or_absent(path: Path, value: float) -> None:
    """The directory loads exactly as ``value`` or holds no ``.metadata`` at all."""
    if (path / METADATA_FILE).exists():
        assert_loads_as(path, value)


@pytest.mark.parametrize(
    "how, returncode, engine",
    [("return", 0, "threads"), ("return", 0, "io_uring"), ("exit", 3, "threads"), ("raise", 1, "threads")],
)
def test_a_normal_exit_finishes_the_in_flight_save(tmp_path, how, returncode, engine):
    code, _, err = run_script(tmp_path, how, delay=0.03, engine=engine)
    assert code == returncode, err
    assert "cannot schedule new futures" not in err
    assert_loads_as(tmp_path / "step-2", 2.0)  # completed, as stock async_save does
    assert_loads_as(tmp_path / "step-1", 1.0)
    if how == "raise":
        assert "ValueError: training crashed" in err


def test_two_saves_in_flight_at_exit_both_finish(tmp_path):
    code, _, err = run_script(tmp_path, "second", delay=0.03)
    assert code == 0, err
    assert_loads_as(tmp_path / "step-2", 2.0)
    assert_loads_as(tmp_path / "step-3", 3.0)


@pytest.mark.parametrize("how", ["sigint", "sigint-waiting"])
def test_ctrl_c_abandons_the_save_promptly_and_keeps_the_previous_checkpoint(tmp_path, how):
    # 0.2 s per write and ~100 writes on 4 threads: finishing the save would take > 5 s after the
    # signal; abandoning waits only for the writes already queued (<= 8).
    code, elapsed, err = run_script(tmp_path, how, delay=0.2, signum=signal.SIGINT)
    assert code != 0, err
    assert "KeyboardInterrupt" in err
    assert "abandoning in-flight checkpoint saves" in err
    assert elapsed < PROMPT_S, (elapsed, err)
    # The overwrite was abandoned: the previous checkpoint (same directory) is untouched and the
    # abandoned save left no data files behind.
    assert_loads_as(tmp_path / "step-1", 1.0)
    names = sorted(p.name for p in (tmp_path / "step-1").iterdir())
    tags = {name.split("_")[3] for name in names if name.startswith("__0_")}
    assert len(tags) == 1, names  # only step-1's own files


def test_sigterm_ends_the_process_at_once_and_nothing_incomplete_looks_complete(tmp_path):
    code, elapsed, err = run_script(tmp_path, "sigterm", delay=0.2, signum=signal.SIGTERM)
    assert code == -signal.SIGTERM, err
    assert elapsed < PROMPT_S
    assert not (tmp_path / "step-2" / METADATA_FILE).exists()  # killed long before the save could end
    assert_complete_or_absent(tmp_path / "step-2", 2.0)
    assert_loads_as(tmp_path / "step-1", 1.0)
