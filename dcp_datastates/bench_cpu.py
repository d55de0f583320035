"""What a benchmark needs besides a clock: CPU time of the whole process tree, and a busy machine.

CPU time is what a checkpoint takes from training on a node whose cores are never idle (data
loaders, the training loop's thread, the collective library). ``CpuClock`` reads it for this
process -- every thread, kernel time included (``RUSAGE_SELF``) -- plus every descendant
process (torch_checkpointing writes from a process of its own), so each method is charged
for all the work it causes on this machine. Work the kernel does on no process's behalf
(page-cache writeback by kernel threads) is not counted: it favours buffered writers, which
is why the O_DIRECT rows are compared with stock rows as they are, not corrected.

``busy_cores`` starts one CPU-burning process per core for the duration of a measurement,
so that a benchmark shows what a save costs and achieves when it has to compete for every
core. The burners are killed when the block ends -- also on an exception or Ctrl-C -- and
die with the benchmark if it is killed (``PR_SET_PDEATHSIG``), so none outlives it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

_TICK = 1.0 / os.sysconf("SC_CLK_TCK")

#: A burner: die with the parent (prctl PR_SET_PDEATHSIG, SIGKILL), exit if it is already gone, spin.
_BURN = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None).prctl(1, 9)\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(0)\n"
    "while True:\n"
    "    pass\n"
)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds consumed so far: this process, reaped children, and each live descendant."""

    own: float
    reaped: float
    descendants: dict[int, float] = field(default_factory=dict)


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """``(parent pid, user + system CPU seconds)`` of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) * _TICK


class CpuClock:
    """CPU seconds of this process tree, excluding ``exclude`` (the busy-machine burners)."""

    def __init__(self, exclude: frozenset[int] = frozenset()) -> None:
        self.exclude = exclude

    def sample(self) -> CpuSample:
        own = resource.getrusage(resource.RUSAGE_SELF)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return CpuSample(own.ru_utime + own.ru_stime, reaped.ru_utime + reaped.ru_stime, self._descendants())

    def _descendants(self) -> dict[int, float]:
        if not os.path.isdir("/proc"):
            return {}
        children: dict[int, list[tuple[int, float]]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _proc_stat(int(entry))
                if stat is not None:
                    children.setdefault(stat[0], []).append((int(entry), stat[1]))
        out: dict[int, float] = {}
        todo = [os.getpid()]
        while todo:
            for pid, cpu in children.get(todo.pop(), []):
                if pid not in self.exclude and pid not in out:
                    out[pid] = cpu
                    todo.append(pid)
        return out

    @staticmethod
    def between(start: CpuSample, end: CpuSample) -> float:
        """CPU seconds the tree used from ``start`` to ``end``.

        A child reaped in between is counted whole by ``RUSAGE_CHILDREN``: what it had used
        before ``start`` is taken off again.
        """
        live = sum(cpu - start.descendants.get(pid, 0.0) for pid, cpu in end.descendants.items())
        gone = sum(cpu for pid, cpu in start.descendants.items() if pid not in end.descendants)
        return (end.own - start.own) + max(0.0, end.reaped - start.reaped - gone) + live


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def busy_cores(count: int | None = None) -> Iterator[frozenset[int]]:
    """Run ``count`` (default: one per core) CPU-burning processes while the block runs; yields their pids."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    burners: list[subprocess.Popen] = []
    try:
        for i in range(count if count is not None else len(cores)):
            burner = subprocess.Popen([sys.executable, "-c", _BURN, str(os.getpid())], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            burners.append(burner)
            if hasattr(os, "sched_setaffinity"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(burner.pid, {cores[i % len(cores)]})  # one per core, not all on one
        yield frozenset(b.pid for b in burners)
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


def burner_pids_alive(pids: frozenset[int]) -> list[int]:
    """Which of ``pids`` still run -- exist and are not zombies (tests use it to prove the burners are gone)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            alive.append(pid)
    return alive
