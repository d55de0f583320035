"""The benchmark's CPU accounting and busy machine: children are charged, burners are not, and none outlives its block."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dcp_datastates import bench_cpu
from dcp_datastates.bench_cpu import CpuClock, burner_pids_alive, busy_cores

SPIN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end:\n    pass\n"


def test_a_child_process_cpu_is_charged_and_the_burners_are_not_and_all_burners_stop():
    with busy_cores(2) as burners:
        assert len(burners) == 2 and sorted(burner_pids_alive(burners)) == sorted(burners)
        clock = CpuClock(exclude=burners)
        start = clock.sample()
        child = subprocess.Popen([sys.executable, "-c", SPIN])
        time.sleep(0.05)
        middle = clock.sample()
        assert child.pid in middle.descendants and not burners & middle.descendants.keys()
        child.wait()  # reaped: its CPU moves to RUSAGE_CHILDREN, counted once
        used = CpuClock.between(start, clock.sample())
        assert 0.25 <= used < 1.5, used  # the child's 0.3 s (plus interpreter start), not two spinning burners'
    assert burner_pids_alive(burners) == []


def test_burners_stop_when_the_measurement_fails():
    with pytest.raises(RuntimeError, match="measurement failed"):
        with busy_cores(1) as burners:
            assert burner_pids_alive(burners)
            raise RuntimeError("measurement failed")
    assert burner_pids_alive(burners) == []


def test_burners_die_with_a_benchmark_that_is_killed():
    """SIGKILL runs no cleanup: the burners' PR_SET_PDEATHSIG ends them anyway."""
    # The module alone (standard library only), not the package: no torch import to wait for.
    script = ("import importlib.util, sys, time\n"
              "spec = importlib.util.spec_from_file_location('bench_cpu', sys.argv[1])\n"
              "module = sys.modules['bench_cpu'] = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(module)\n"
              "with module.busy_cores(2) as pids:\n    print(*pids, flush=True)\n    time.sleep(60)\n")
    bench = subprocess.Popen([sys.executable, "-c", script, bench_cpu.__file__], stdout=subprocess.PIPE, text=True)
    try:
        burners = frozenset(int(p) for p in bench.stdout.readline().split())
        assert len(burners) == 2 and burner_pids_alive(burners)
        deadline = time.monotonic() + 30  # until both spin: past their start-up check of the parent
        while min(bench_cpu._proc_stat(pid)[1] for pid in burners) < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        bench.kill()
        bench.wait()
    deadline = time.monotonic() + 10
    while burner_pids_alive(burners) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert burner_pids_alive(burners) == []
