"""The GPU proof in one call: GPU tests, save/load benchmark and training loop, each time-boxed.

    python -m dcp_datastates.gpu_proof --device cuda --out DIR --budget-s 400
    python -m dcp_datastates.gpu_proof --device cpu --tiny --out DIR      # CI: same code, tiny sizes

A GPU machine is lent rarely and briefly, so everything it should prove runs from one command
that returns, within its budget, one JSON document even when a phase fails or hangs. Phases
(``gpu_proof_phases`` implements them), in this order unless ``--phases`` says otherwise:

* ``tests`` -- every test marked ``gpu`` (pytest, in its own process);
* ``bench`` -- save and load of a >= 4 GiB GPU state: raw O_DIRECT ceilings, pinned and pageable
  device-to-host copies, stock DCP and ours side by side, loads into CUDA tensors;
* ``train`` -- a 1B-parameter mixed-precision training loop checkpointing every 5 steps: no
  checkpoints, ours async, stock async with pinned staging, stock sync.

Each phase runs in a process group of its own with a time box: on overrun the whole group is
killed (SIGTERM, then SIGKILL), the phase is recorded as ``timeout`` with what it had measured so
far (phases write their figures as they go), and the next phase still runs. Boxes come from the
budget: a phase gets at most its nominal box and never eats into what the later phases need at
least; the last phase gets what is left. The driver never touches CUDA (it holds no context and no
GPU memory while the phases run); its pydantic models are the document's schema, used both to
build the document and by the phases to write their figures, so producer and schema cannot drift.

``$OUT`` receives ``gpu_proof.json`` (rewritten after every phase, ``finished`` once all ran) and
one log per phase.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

PhaseName = Literal["tests", "bench", "train"]
PHASES: tuple[PhaseName, ...] = ("tests", "bench", "train")
DOCUMENT = "gpu_proof.json"
#: Test-only: the named phases' processes (comma-separated) hang instead of doing their work (``HANG_SCRIPT``).
HANG_ENV = "DCP_GPU_PROOF_TEST_HANG"
#: What runs in that phase's place: it publishes partial figures (``argv[1]`` to the file ``argv[2]``),
#: ignores SIGTERM and leaves a child in its process group, so only a SIGKILL of the whole group ends
#: it. Plain Python: it hangs within milliseconds of its start.
HANG_SCRIPT = """
import os, signal, subprocess, sys, time
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(sys.argv[1])
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"])
print(f"hanging on purpose; grandchild pid {child.pid}", flush=True)
while True:
    time.sleep(3600)
"""
GiB = 1024**3


# -- the document's schema --------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuTestFigures(_Model):
    """Outcome of every collected ``gpu`` test (written after each test, so a killed run keeps its part)."""

    phase: Literal["tests"] = "tests"
    files: list[str]
    collected: int | None = None
    outcomes: dict[str, Literal["passed", "failed", "skipped", "error", "xfailed", "xpassed"]] = {}
    exit_code: int | None = None

    def count(self, outcome: str) -> int:
        return sum(o == outcome for o in self.outcomes.values())


class Row(_Model):
    """One benchmark method: every timed run of it; median and rate follow from them."""

    method: str
    kind: Literal["ceiling", "copy", "save", "load"]
    bytes: int
    seconds: list[float] = []
    error: str | None = None
    #: what the method reported per run, latest run last (e.g. our writer's ``device_copies``)
    stats: dict[str, float | int | str | bool | None] = {}
    median_s: float | None = None
    gib_per_s: float | None = None

    @model_validator(mode="after")
    def _medians(self) -> "Row":
        self.median_s = statistics.median(self.seconds) if self.seconds else None
        self.gib_per_s = self.bytes / self.median_s / GiB if self.median_s else None
        return self


class _Measured(_Model):
    """What every measuring phase says about where it ran and how large its state was."""

    device: str
    gpu_name: str | None = None
    torch: str
    state_bytes: int


class BenchFigures(_Measured):
    phase: Literal["bench"] = "bench"
    tensors: int
    rounds: int = 0
    cold_page_cache: bool | None = None  # None: no load measured yet
    warm_up_s: dict[str, float] = {}
    pool_bytes: int | None = None  # our host staging pool after the warm-up (it holds the state, or staging streams)
    pool_pinned: bool | None = None
    rows: list[Row] = []
    skipped: list[str] = []  # what was not measured, and why

    def row(self, method: str) -> Row | None:
        return next((r for r in self.rows if r.method == method), None)


class MethodFigures(_Model):
    """One training method over its runs: the loop's time, the wait for its last checkpoint, every stall."""

    method: str
    steps_seconds: list[float] = []
    drain_seconds: list[float] = []
    total_seconds: list[float] = []
    stalls_s: list[float] = []


class TrainPlan(_Model):
    """How the loop was sized: 5 steps take about as long as the disk needs for one checkpoint."""

    disk_gib_per_s: float  # raw O_DIRECT probe in the phase's directory
    write_gib_per_s: float  # rate assumed for our checkpoint writes
    rate_source: str  # where that rate came from
    write_estimate_s: float
    microbatch_s: float
    optimizer_step_s: float
    target_step_s: float
    accum: int
    keep: int  # checkpoints kept on disk per method
    estimates_s: dict[str, float]


class SkippedMethod(_Model):
    method: str
    reason: str
    estimate_s: float | None = None


class TrainFigures(_Measured):
    phase: Literal["train"] = "train"
    params: int
    dtype: str
    steps: int
    every: int
    dim: int
    layers: int
    heads: int
    vocab: int
    seq: int
    batch: int
    plan: TrainPlan | None = None
    methods: list[MethodFigures] = []
    skipped: list[SkippedMethod] = []

    def method(self, name: str) -> MethodFigures | None:
        return next((m for m in self.methods if m.method == name), None)


Figures = Annotated[GpuTestFigures | BenchFigures | TrainFigures, Field(discriminator="phase")]


class PhaseRecord(_Model):
    name: PhaseName
    status: Literal["ok", "failed", "timeout", "skipped"]
    reason: str | None = None
    rc: int | None = None
    box_s: float | None = None
    seconds: float = 0.0
    log: str | None = None  # file name in the output directory
    log_tail: str = ""
    figures: Figures | None = None


class GoalCheck(_Model):
    name: str
    goal: str
    passed: bool | None  # None: the figures it compares were not measured
    value: float | None = None
    limit: float | None = None
    detail: str
    at_scale: bool  # measured on a GPU at the size the goal speaks of (not a CPU smoke run)


class Environment(_Model):
    started_utc: str
    device: Literal["cuda", "cpu"]
    tiny: bool
    budget_s: float
    python: str
    kernel: str
    machine: str
    torch: str | None
    torch_cuda: str | None
    nvidia_driver: str | None
    gpu_name: str | None
    gpu_memory_mib: int | None
    cpu_cores: int
    load_average: list[float]
    host_memory_gib: float | None
    host_available_gib: float | None
    bench_dir: str
    bench_dir_fstype: str | None
    disk_free_gib: float
    packages: dict[str, str | None]
    git_commit: str | None


class ProofDocument(_Model):
    schema_version: Literal[1] = 1
    environment: Environment
    phases: list[PhaseRecord]
    goals: list[GoalCheck]
    seconds: float
    finished: bool
    all_ok: bool


# -- the goals ------------------------------------------------------------------------------------------
OURS_ENGINES = ("io_uring", "threads")
PINNED_D2H = "pinned device-to-host copy"
STOCK_SAVES = ("stock FileSystemWriter", "stock async_save + pinned DefaultStager")
STOCK_LOAD, OURS_LOAD = "stock FileSystemReader", "DataStatesReader"
TRAIN_OURS, TRAIN_STOCK_ASYNC, TRAIN_NONE = "DataStatesWriter async", "stock async_save + DefaultStager", "none"
#: ``bench_training.METHOD_KEYS``' keys, in the train phase's order of priority
TRAIN_METHOD_KEYS = ("none", "datastates", "stock-async", "stock-sync")


def ours_save(engine: str) -> str:
    return f"DataStatesWriter {engine}"


def _figures(phases: list[PhaseRecord], kind: type) -> "GpuTestFigures | BenchFigures | TrainFigures | None":
    return next((p.figures for p in phases if isinstance(p.figures, kind)), None)


def _goal(name: str, goal: str, value: float | None, limit: float | None, ok: Callable[[float, float], bool],
          detail: str, at_scale: bool) -> GoalCheck:
    passed = None if value is None or limit is None else bool(ok(value, limit))
    return GoalCheck(name=name, goal=goal, passed=passed, value=value, limit=limit, detail=detail, at_scale=at_scale)


def ours_copy_gib_per_s(bench: BenchFigures) -> float | None:
    """Our snapshots' copy rate: tensor bytes over copy seconds, median over every save of ours."""
    rates = []
    for engine in OURS_ENGINES:
        row = bench.row(ours_save(engine))
        if row is not None and row.seconds and row.stats.get("copy_seconds"):
            rates.append(float(row.stats["tensor_bytes"] or 0) / float(row.stats["copy_seconds"] or 1) / GiB)
    return statistics.median(rates) if rates else None


def evaluate_goals(phases: list[PhaseRecord], device: str) -> list[GoalCheck]:
    """The issue's goals, each a boolean with the two numbers it compares (None where not measured)."""
    goals: list[GoalCheck] = []
    cuda = device == "cuda"
    tests = _figures(phases, GpuTestFigures)
    if isinstance(tests, GpuTestFigures):
        passed, collected = tests.count("passed"), tests.collected or 0
        goals.append(_goal("gpu_tests_pass", "every gpu-marked test passes (none skipped)", float(passed),
                           float(collected) if collected else None, lambda v, n: v == n,
                           f"{passed} of {collected} passed; {tests.count('failed')} failed, {tests.count('error')} "
                           f"errors, {tests.count('skipped')} skipped", cuda))
    bench = _figures(phases, BenchFigures)
    if isinstance(bench, BenchFigures):
        big = cuda and bench.state_bytes >= 4 * GiB
        pinned = bench.row(PINNED_D2H)
        copy = ours_copy_gib_per_s(bench)
        pinned_rate = pinned.gib_per_s if pinned else None
        goals.append(_goal("d2h_at_80pct_of_pinned", "our device-to-host copies run at >= 80% of pinned D2H bandwidth",
                           copy, None if pinned_rate is None else 0.8 * pinned_rate, lambda v, lim: v >= lim,
                           f"ours {_rate(copy)} vs 80% of pinned {_rate(pinned_rate)}", big))
        stock_rates = [r.gib_per_s for r in (bench.row(m) for m in STOCK_SAVES) if r is not None and r.gib_per_s]
        best_stock = max(stock_rates) if stock_rates else None
        for engine in OURS_ENGINES:
            row = bench.row(ours_save(engine))
            rate = row.gib_per_s if row else None
            goals.append(_goal(f"save_{engine}_at_least_stock", f"save throughput ({engine}) >= the best stock row",
                               rate, best_stock, lambda v, lim: v >= lim,
                               f"ours {_rate(rate)} vs best stock {_rate(best_stock)}", big))
        ours_load, stock_load = bench.row(OURS_LOAD), bench.row(STOCK_LOAD)
        ours_rate = ours_load.gib_per_s if ours_load else None
        stock_rate = stock_load.gib_per_s if stock_load else None
        goals.append(_goal("load_1_5x_stock", "load into CUDA tensors >= 1.5x stock FileSystemReader", ours_rate,
                           None if stock_rate is None else 1.5 * stock_rate, lambda v, lim: v >= lim,
                           f"ours {_rate(ours_rate)} vs 1.5 x stock {_rate(stock_rate)}", big))
    train = _figures(phases, TrainFigures)
    if isinstance(train, TrainFigures):
        large = cuda and train.params >= 10**9
        ours, stock, none = train.method(TRAIN_OURS), train.method(TRAIN_STOCK_ASYNC), train.method(TRAIN_NONE)
        ours_mean = statistics.mean(ours.stalls_s) if ours and ours.stalls_s else None
        stock_mean = statistics.mean(stock.stalls_s) if stock and stock.stalls_s else None
        goals.append(_goal("stall_below_stock_async", "mean per-checkpoint stall below stock async + pinned staging",
                           ours_mean, stock_mean, lambda v, lim: v < lim,
                           f"ours {_ms(ours_mean)} vs stock async {_ms(stock_mean)} (means)", large))
        ours_max = max(ours.stalls_s) if ours and ours.stalls_s else None
        goals.append(_goal("stall_under_100ms", "every per-checkpoint stall < 100 ms", ours_max, 0.1,
                           lambda v, lim: v < lim, f"worst of ours {_ms(ours_max)}", large))
        overhead = None
        if ours and none and ours.steps_seconds and none.steps_seconds:
            base = statistics.median(none.steps_seconds)
            overhead = (statistics.median(ours.steps_seconds) - base) / base
        goals.append(_goal("overhead_at_most_5pct", f"training overhead <= 5% at a checkpoint every {train.every} steps",
                           overhead, 0.05, lambda v, lim: v <= lim,
                           "ours' loop time over none's, the last checkpoint's drain excluded: "
                           + ("not measured" if overhead is None else f"{overhead:+.1%}"), large))
    return goals


def _rate(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f} GiB/s"


def _ms(value: float | None) -> str:
    return "not measured" if value is None else f"{value * 1000:.0f} ms"


# -- the environment --------------------------------------------------------------------------------------
def _command(args: list[str], timeout: float = 20) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _meminfo() -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                out[key] = int(value.split()[0]) * 1024 / GiB
    except (OSError, ValueError):
        pass
    return out


def fstype_of(path: Path) -> str | None:
    """The file system type of the mount holding ``path`` (longest mount point that contains it)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    resolved = str(path.resolve())
    best: tuple[int, str] | None = None
    for fields in mounts:
        point = fields[1]
        if resolved == point or resolved.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) > best[0]:
                best = (len(point), fields[2])
    return best[1] if best else None


def collect_environment(device: str, tiny: bool, budget_s: float, bench_dir: Path, repo: Path) -> Environment:
    import torch  # imported with the package already; nothing here initialises CUDA

    gpu = _command(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"])
    name = memory = driver = None
    if gpu:
        parts = [p.strip() for p in gpu.splitlines()[0].split(",")]
        if len(parts) == 3:
            name, driver = parts[0], parts[2]
            memory = int(float(parts[1])) if parts[1].replace(".", "", 1).isdigit() else None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    memory_info = _meminfo()
    return Environment(
        started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device, tiny=tiny, budget_s=budget_s, python=platform.python_version(), kernel=platform.release(),
        machine=platform.machine(), torch=torch.__version__, torch_cuda=torch.version.cuda, nvidia_driver=driver,
        gpu_name=name, gpu_memory_mib=memory, cpu_cores=cores, load_average=[round(x, 2) for x in os.getloadavg()],
        host_memory_gib=memory_info.get("MemTotal"), host_available_gib=memory_info.get("MemAvailable"),
        bench_dir=str(bench_dir), bench_dir_fstype=fstype_of(bench_dir),
        disk_free_gib=shutil.disk_usage(bench_dir).free / GiB,
        packages={n: _version(n) for n in ("dcp-datastates", "pydantic", "numba", "liburing", "pytest", "xxhash")},
        git_commit=_command(["git", "-C", str(repo), "rev-parse", "HEAD"], timeout=5),
    )


# -- running a phase ----------------------------------------------------------------------------------------
#: Nominal boxes and the least time a phase is worth starting with, per device (seconds).
#: The last phase run gets whatever is left; see docs/gpu.md for the arithmetic.
NOMINAL_S = {"cuda": {"tests": 90.0, "bench": 75.0, "train": 400.0}, "cpu": {"tests": 240.0, "bench": 240.0, "train": 240.0}}
MINIMUM_S = {"cuda": {"tests": 30.0, "bench": 40.0, "train": 90.0}, "cpu": {"tests": 1.0, "bench": 1.0, "train": 1.0}}
LOG_TAIL_CHARS = 4000


@dataclass
class PhaseRun:
    """How one phase ended (the driver turns it into a ``PhaseRecord``)."""

    rc: int | None
    seconds: float
    timed_out: bool


class _Interrupted(Exception):
    """The driver itself was asked to stop (SIGTERM/SIGINT): the current phase is killed, the document kept."""


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the phase's process group, then SIGKILL whatever is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; members of its group may not be: SIGKILL them too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break


def run_phase(command: list[str], env: dict[str, str], cwd: Path, box_s: float, log_path: Path, prefix: str,
              echo: TextIO, grace_s: float = 5.0) -> PhaseRun:
    """Run ``command`` in a new process group, its output to ``log_path`` and ``echo``; kill it at ``box_s``."""
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1, **group)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                echo.write(f"[{prefix}] {line}")
                echo.flush()

        reader = threading.Thread(target=pump, name="gpu-proof-log", daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=box_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc, grace_s)
        except BaseException:
            _kill_group(proc, grace_s)
            raise
        finally:
            try:  # what the phase left running in its group (a test's stray child) goes with it
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            reader.join(timeout=10)  # a process that left the group may hold the pipe: do not wait for it
        if timed_out:
            log.write(f"\n[gpu-proof] {prefix}: killed at its {box_s:.0f} s box\n")
    return PhaseRun(proc.returncode, time.monotonic() - start, timed_out)


def log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-LOG_TAIL_CHARS:]


def read_figures(path: Path) -> "tuple[GpuTestFigures | BenchFigures | TrainFigures | None, str | None]":
    """The figures a phase wrote, validated against the schema; (None, why) where there are none or they are bad."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, "the phase wrote no figures"
    try:
        return _FIGURES.validate_json(text), None
    except ValidationError as exc:
        return None, f"the phase's figures do not match the schema: {exc}"


_FIGURES: TypeAdapter = TypeAdapter(Figures)


def phase_boxes(order: list[PhaseName], device: str, overrides: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    nominal = dict(NOMINAL_S[device]) | overrides
    minimum = {name: min(MINIMUM_S[device][name], nominal[name]) for name in PHASES}
    return nominal, minimum


def box_for(index: int, order: list[PhaseName], remaining: float, nominal: dict[str, float],
            minimum: dict[str, float]) -> float:
    """A phase's box: its nominal one, less what the phases after it need at least; the last gets the rest."""
    name = order[index]
    later = sum(minimum[n] for n in order[index + 1 :])
    if index == len(order) - 1:
        return min(remaining, nominal[name])
    return min(nominal[name], remaining - later)


# -- the driver -----------------------------------------------------------------------------------------------
class Driver:
    def __init__(self, args: argparse.Namespace, echo: TextIO = sys.stdout) -> None:
        self.args = args
        self.echo = echo
        self.out: Path = args.out
        self.repo = Path(__file__).resolve().parent.parent
        self.begin = time.monotonic()
        self.deadline = self.begin + args.budget_s
        self.work = Path(tempfile.mkdtemp(prefix="gpu_proof_", dir=args.dir))
        self.environment = collect_environment(args.device, args.tiny, args.budget_s, args.dir, self.repo)
        self.records: dict[str, PhaseRecord] = {
            name: PhaseRecord(name=name, status="skipped", reason="not in --phases") for name in PHASES
        }

    def say(self, message: str) -> None:
        self.echo.write(f"[gpu-proof] {message}\n")
        self.echo.flush()

    def document(self, finished: bool) -> ProofDocument:
        selected = [self.records[n] for n in self.args.phases]
        phases = [self.records[n] for n in PHASES]
        return ProofDocument(environment=self.environment, phases=phases,
                             goals=evaluate_goals(phases, self.args.device), seconds=time.monotonic() - self.begin,
                             finished=finished, all_ok=finished and all(r.status == "ok" for r in selected))

    def write(self, finished: bool) -> ProofDocument:
        document = self.document(finished)
        temp = self.out / f".{DOCUMENT}.tmp"
        temp.write_text(document.model_dump_json(indent=2))
        os.replace(temp, self.out / DOCUMENT)
        return document

    def command(self, name: PhaseName, box_s: float, figures: Path, scratch: Path) -> list[str]:
        args = self.args
        if name in os.environ.get(HANG_ENV, "").split(","):
            partial = {"tests": GpuTestFigures(files=[]),
                       "bench": BenchFigures(device=args.device, torch="-", state_bytes=0, tensors=0,
                                             skipped=["hung on purpose"]),
                       "train": TrainFigures(device=args.device, torch="-", state_bytes=0, params=0, dtype="-", steps=0,
                                             every=0, dim=0, layers=0, heads=0, vocab=0, seq=0, batch=0)}[name]
            return [sys.executable, "-c", HANG_SCRIPT, partial.model_dump_json(), str(figures)]
        command = [sys.executable, "-m", "dcp_datastates.gpu_proof_phases", name, "--device", args.device,
                   "--figures", str(figures), "--dir", str(scratch),
                   "--budget-s", f"{max(1.0, box_s - min(10.0, 0.1 * box_s)):.1f}"]
        if args.tiny:
            command.append("--tiny")
        if name == "tests":
            command += ["--tests-dir", str(self.repo / "tests")]
        bench_figures = self.work / "bench.json"
        if name == "train" and bench_figures.exists():
            command += ["--hints", str(bench_figures)]
        if name == "train":
            command += ["--methods", ",".join(args.train_methods)]
        return command

    def phase_env(self, name: PhaseName) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if name == "tests" and self.args.device == "cuda":
            # A kernel's first launch loads its module, and that waits for the device to go idle: it would
            # serialise what the GPU tests time. They warm their kernels up; eager loading is the second line.
            env["CUDA_MODULE_LOADING"] = "EAGER"
        return env

    def run(self) -> ProofDocument:
        order: list[PhaseName] = self.args.phases
        nominal, minimum = phase_boxes(order, self.args.device, self.args.box)
        self.write(False)
        for index, name in enumerate(order):
            remaining = self.deadline - time.monotonic()
            box = box_for(index, order, remaining, nominal, minimum)
            if box < minimum[name]:
                later = sum(minimum[n] for n in order[index + 1 :])
                self.records[name] = PhaseRecord(name=name, status="skipped", box_s=round(max(box, 0.0), 1),
                                                 reason=f"budget: {remaining:.0f} s left; this phase needs at least "
                                                        f"{minimum[name]:.0f} s and the phases after it {later:.0f} s")
                self.say(f"{name}: skipped, {self.records[name].reason}")
                self.write(False)
                continue
            self.records[name] = self.run_one(name, box)
            self.write(False)
        document = self.write(True)
        shutil.rmtree(self.work, ignore_errors=True)
        self.say(f"done in {document.seconds:.0f} s: " + ", ".join(f"{p.name} {p.status}" for p in document.phases))
        for goal in document.goals:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[goal.passed]
            self.say(f"goal {goal.name}: {verdict} ({goal.detail}){'' if goal.at_scale else ' [not at scale]'}")
        return document

    def run_one(self, name: PhaseName, box: float) -> PhaseRecord:
        figures = self.work / f"{name}.json"
        scratch = self.work / f"{name}-scratch"
        scratch.mkdir()
        log = self.out / f"{name}.log"
        self.say(f"{name}: starting, box {box:.0f} s ({self.deadline - time.monotonic():.0f} s of the budget left)")
        try:
            ran = run_phase(self.command(name, box, figures, scratch), self.phase_env(name), self.repo, box, log, name,
                            self.echo, self.args.kill_grace_s)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # a killed phase leaves its checkpoints: never the next one's room
        found, problem = read_figures(figures)
        if ran.timed_out:
            status, reason = "timeout", f"killed at its {box:.0f} s box"
        elif ran.rc != 0:
            status, reason = "failed", f"exit status {ran.rc}"
        elif problem is not None:
            status, reason = "failed", problem
        else:
            status, reason = "ok", None
        if problem is not None and status != "ok" and problem != "the phase wrote no figures":
            reason = f"{reason}; {problem}"
        self.say(f"{name}: {status} in {ran.seconds:.1f} s" + (f" ({reason})" if reason else ""))
        return PhaseRecord(name=name, status=status, reason=reason, rc=ran.rc, box_s=round(box, 1),
                           seconds=round(ran.seconds, 2), log=log.name, log_tail=log_tail(log), figures=found)


def _box(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in PHASES or not seconds:
        raise argparse.ArgumentTypeError(f"--box {text!r}: write PHASE=SECONDS with PHASE one of {', '.join(PHASES)}")
    return name, float(seconds)


def _phases(text: str) -> list[PhaseName]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PHASES]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--phases {text!r}: a comma-separated list of distinct phases from {', '.join(PHASES)}")
    return names  # type: ignore[return-value]


def _train_methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in TRAIN_METHOD_KEYS for n in names):
        raise argparse.ArgumentTypeError(f"--train-methods {text!r}: a comma-separated subset of {', '.join(TRAIN_METHOD_KEYS)}")
    return [n for n in TRAIN_METHOD_KEYS if n in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dcp_datastates.gpu_proof", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CI on CPU): the same code, seconds per phase")
    parser.add_argument("--out", type=Path, required=True, help=f"where {DOCUMENT} and the phase logs go")
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory on the disk to measure (default: $BENCH_DIR, else the system's temp dir)")
    parser.add_argument("--budget-s", type=float, default=400.0, help="wall-clock budget of all phases together")
    parser.add_argument("--phases", type=_phases, default=list(PHASES), help="phases to run, in this order")
    parser.add_argument("--box", type=_box, action="append", default=[], metavar="PHASE=SECONDS",
                        help="a phase's nominal time box (default per device; see docs/gpu.md)")
    parser.add_argument("--train-methods", type=_train_methods, default=list(TRAIN_METHOD_KEYS),
                        help="training methods to run (a rerun of what the budget left out, e.g. none,stock-sync)")
    parser.add_argument("--kill-grace-s", type=float, default=5.0, help="SIGTERM to SIGKILL delay for a phase at its box")
    args = parser.parse_args(argv)
    args.box = dict(args.box)
    args.dir = (args.dir or Path(os.environ.get("BENCH_DIR") or tempfile.gettempdir())).resolve()
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    driver = Driver(args)

    def interrupted(signum: int, frame: object) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        document = driver.run()
    except _Interrupted as stop:
        driver.say(f"stopped by {stop}: the document keeps the phases that ran")
        driver.write(False)
        shutil.rmtree(driver.work, ignore_errors=True)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if document.all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
