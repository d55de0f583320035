"""The phases of the GPU proof, one per process: ``python -m dcp_datastates.gpu_proof_phases PHASE ...``.

Started by ``gpu_proof`` (the driver), which boxes each in time. Every phase writes its figures
(``gpu_proof``'s models) to ``--figures`` as it goes -- after each test, each benchmark row, each
training method -- so a phase killed at its box still leaves what it measured. ``--budget-s`` is
the phase's own plan: it measures what fits and says what it left out, ahead of the box.

The CPU run (``--device cpu --tiny``) takes the same code paths as the CUDA one wherever CUDA
is not needed: the same states (tiny), the same writers, readers, stagers and training loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from dcp_datastates.gpu_proof import (
    GiB, OURS_ENGINES, OURS_LOAD, PINNED_D2H, STOCK_LOAD, STOCK_SAVES, BenchFigures, MethodFigures, Row,
    SkippedMethod, GpuTestFigures, TrainFigures, TrainPlan, _Model, ours_save,
)

MiB = 1024**2
#: Rounds at most (each method once per round, the order rotating); fewer where the budget ends first.
MAX_ROUNDS = {"bench": 3, "train": 2}
RAW_WRITE, RAW_READ, PAGEABLE_D2H = "raw O_DIRECT write (ceiling)", "raw O_DIRECT read, QD 8 (ceiling)", "pageable device-to-host copy"


class Clock:
    """The phase's own budget (the driver's box, less a margin to exit in)."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)


def publish(figures: _Model, path: Path) -> None:
    """Write ``figures`` atomically: the driver may read the file at any moment after a kill."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(figures.model_dump_json(indent=1))
    os.replace(temp, path)


# -- tests -------------------------------------------------------------------------------------------------
GPU_MARK = re.compile(r"\bmark\.gpu\b")


def gpu_test_files(tests_dir: Path) -> list[Path]:
    """Test files that mark tests ``gpu`` (``pytest.mark.gpu``, as a decorator, ``pytestmark`` or ``marks=``).

    Collecting only these, with ``-m gpu``, selects exactly the gpu tests without importing the
    whole suite (its collection costs more than the GPU tests on a small machine).
    """
    return sorted(p for p in tests_dir.glob("test_*.py") if GPU_MARK.search(p.read_text(errors="replace")))


class _Recorder:
    """A pytest plugin: each test's outcome into the figures, published as it lands."""

    def __init__(self, figures: GpuTestFigures, path: Path) -> None:
        self.figures, self.path = figures, path

    def pytest_collection_finish(self, session: Any) -> None:
        self.figures.collected = len(session.items)
        publish(self.figures, self.path)

    def pytest_runtest_logreport(self, report: Any) -> None:
        outcomes = self.figures.outcomes
        xfail = hasattr(report, "wasxfail")
        if report.when == "setup" and not report.passed:
            outcomes[report.nodeid] = "skipped" if report.skipped else "error"
        elif report.when == "call":
            if xfail:
                outcomes[report.nodeid] = "xfailed" if report.skipped else "xpassed"
            else:
                outcomes[report.nodeid] = report.outcome  # passed, failed or skipped
        elif report.when == "teardown" and report.failed:
            outcomes[report.nodeid] = "error"
        else:
            return
        publish(self.figures, self.path)


def tests_phase(opts: argparse.Namespace) -> int:
    import pytest

    files = gpu_test_files(opts.tests_dir)
    figures = GpuTestFigures(files=[str(p.relative_to(opts.tests_dir.parent)) for p in files])
    publish(figures, opts.figures)
    if not files:
        print(f"no test file in {opts.tests_dir} marks a test gpu", flush=True)
        return 1
    # one process (the recorder sees every test; the GPU image has no pytest-xdist for the project's -n 2)
    code = pytest.main(["-o", "addopts=", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider", *map(str, files)],
                       plugins=[_Recorder(figures, opts.figures)])
    figures.exit_code = int(code)
    publish(figures, opts.figures)
    return 0 if code == 0 else 1


# -- bench ---------------------------------------------------------------------------------------------------
def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _gpu_name(device: str) -> str | None:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else None


def tiny_state(device: str) -> dict:
    """``bench.make_state``'s mix (norms and large matrices, nested, a step) at 8 MiB: its matrices are 64 MiB each."""
    import torch

    model = {f"layers.{i}.norm.weight": torch.randn(4096, device=device) for i in range(4)}
    model |= {f"layers.{i}.mlp.weight": torch.randn(2**19, device=device) for i in range(4)}
    return {"model": model, "step": 1000}


def copy_rate_rows(device: str, nbytes: int, runs: int = 3) -> list[Row]:
    """One large device-to-host copy into pinned and into pageable host memory: the bandwidth references."""
    import torch

    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    rows = []
    for name, pinned in ((PINNED_D2H, device == "cuda"), (PAGEABLE_D2H, False)):
        target = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        target.copy_(source, non_blocking=pinned)  # first touch and pinning outside the clock
        row = Row(method=name, kind="copy", bytes=nbytes, stats={"pinned": pinned})
        for _ in range(runs):
            _synchronize(device)
            start = time.perf_counter()
            target.copy_(source, non_blocking=pinned)
            _synchronize(device)
            row.seconds.append(time.perf_counter() - start)
        rows.append(Row.model_validate(row.model_dump()))
        del target
    return rows


class BenchRun:
    """The save and load benchmark of one state: rows measured round-robin, figures published after each."""

    def __init__(self, opts: argparse.Namespace) -> None:
        import torch

        from dcp_datastates import bench
        from dcp_datastates.bench_training import staging_options
        from torch.distributed.checkpoint.staging import DefaultStager

        self.opts, self.device, self.clock = opts, opts.device, Clock(opts.budget_s)
        self.directory: Path = opts.dir
        # make_state rounds its 64 MiB matrices down: asking 4.125 GiB gives 4.08 GiB (4 GiB gives 3.96)
        self.state = tiny_state(self.device) if opts.tiny else bench.make_state(4 * GiB + 128 * MiB, self.device)
        self.total = bench.state_bytes(self.state)
        self.figures = BenchFigures(device=self.device, gpu_name=_gpu_name(self.device), torch=torch.__version__,
                                    state_bytes=self.total, tensors=len(self.state["model"]))
        self.stager = DefaultStager(staging_options(self.device))
        self.kept: dict[str, Path] = {}  # the latest checkpoint of ours and of stock: the loads read them
        self.failed_loads: list[str] = []

    def publish(self) -> None:
        self.figures.rows = [Row.model_validate(r.model_dump()) for r in self.figures.rows]  # medians up to date
        publish(self.figures, self.opts.figures)

    def row(self, method: str, kind: str, nbytes: int) -> Row:
        row = self.figures.row(method)
        if row is None:
            row = Row(method=method, kind=kind, bytes=nbytes)  # type: ignore[arg-type]
            self.figures.rows.append(row)
        return row

    def settle(self) -> None:
        from dcp_datastates import bench

        bench.settle() if not self.opts.tiny else os.sync()

    # -- saves
    def save_methods(self) -> dict[str, Callable[[Path], dict[str, Any]]]:
        import torch.distributed.checkpoint as dcp

        from dcp_datastates import DataStatesConfig, DataStatesWriter, bench

        state = self.state

        def raw(path: Path) -> dict[str, Any]:
            path.mkdir()
            bench.raw_o_direct(path, self.raw_bytes)
            return {}

        def stock_fs(path: Path) -> dict[str, Any]:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(path, thread_count=8), no_dist=True)
            return {}

        def stock_async(path: Path) -> dict[str, Any]:
            response = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(path, thread_count=8),
                                      async_stager=self.stager, no_dist=True)
            (response.upload_completion if hasattr(response, "upload_completion") else response).result()
            return {}

        def ours(engine: str) -> Callable[[Path], dict[str, Any]]:
            def save(path: Path) -> dict[str, Any]:
                writer = DataStatesWriter(path, DataStatesConfig(io_engine=engine))  # type: ignore[arg-type]
                dcp.save(state, storage_writer=writer, no_dist=True)
                stats = writer.last_stats
                assert stats is not None
                return {"engine": stats.engine, "tensor_bytes": stats.tensor_bytes, "copy_seconds": stats.copy_seconds,
                        "device_copies": stats.device_copies, "copy_events": stats.copy_events,
                        "tensor_writes": stats.tensor_writes}

            return save

        return {RAW_WRITE: raw, STOCK_SAVES[0]: stock_fs, STOCK_SAVES[1]: stock_async,
                **{ours_save(engine): ours(engine) for engine in OURS_ENGINES}}

    @property
    def raw_bytes(self) -> int:
        chunk = 32 * MiB
        return -(-self.total // chunk) * chunk

    def warm_up(self) -> None:
        """One-time costs outside the clock, as a job pays them once: our pool, the stock stager's pinned copy."""
        import torch.distributed.checkpoint as dcp

        from dcp_datastates import DataStatesConfig, DataStatesWriter
        from dcp_datastates.buffer_pool import HostBufferPool

        start = time.perf_counter()
        path = self.directory / "warm-up"
        dcp.save(self.state, storage_writer=DataStatesWriter(path, DataStatesConfig(io_engine="threads")), no_dist=True)
        shutil.rmtree(path)
        pool = HostBufferPool.auto(DataStatesConfig().chunk_bytes, self.device == "cuda", None)
        pool.wait_ready(120)
        self.figures.warm_up_s["DataStatesWriter: pool allocation and pinning, one save"] = time.perf_counter() - start
        self.figures.pool_bytes, self.figures.pool_pinned = pool.nbytes, pool.pinned
        start = time.perf_counter()
        staged = self.stager.stage(self.state)
        if isinstance(staged, Future):
            staged.result()
        del staged
        self.figures.warm_up_s["stock DefaultStager: one staging (allocates and pins its copy)"] = time.perf_counter() - start
        self.publish()

    def time_save(self, method: str, save: Callable[[Path], dict[str, Any]], round_: int) -> None:
        kind = "ceiling" if method == RAW_WRITE else "save"
        row = self.row(method, kind, self.raw_bytes if method == RAW_WRITE else self.total)
        if row.error is not None:
            return  # failed before (e.g. io_uring blocked): said once
        path = self.directory / f"save-{len(row.seconds)}-{round_}-{re.sub(r'[^a-z0-9]+', '-', method.lower())}"
        self.settle()
        try:
            start = time.perf_counter()
            stats = save(path)
            row.seconds.append(time.perf_counter() - start)
            row.stats.update(stats)
        except Exception as exc:  # noqa: BLE001 - a method that cannot run here is a row with its error
            row.error = f"{type(exc).__name__}: {exc}"
            shutil.rmtree(path, ignore_errors=True)
            return
        keep = "ours" if method.startswith("DataStatesWriter") else "stock" if method == STOCK_SAVES[0] else None
        if keep is None:
            shutil.rmtree(path, ignore_errors=True)
            return
        if keep in self.kept:
            shutil.rmtree(self.kept[keep], ignore_errors=True)
        self.kept[keep] = path

    # -- loads
    def load_methods(self) -> dict[str, Callable[[], dict[str, Any]]]:
        import torch
        import torch.distributed.checkpoint as dcp

        from dcp_datastates import DataStatesReader, bench

        target = {"model": {k: torch.zeros_like(v) for k, v in self.state["model"].items()}, "step": None}
        self.target = target
        files = sorted(p for p in self.kept["ours"].iterdir() if p.suffix == ".distcp")

        def raw() -> dict[str, Any]:
            bench.raw_o_direct_read(files, depth=8)
            return {}

        def stock() -> dict[str, Any]:
            dcp.load(target, storage_reader=dcp.FileSystemReader(self.kept["stock"]), no_dist=True)
            return {}

        def ours() -> dict[str, Any]:
            reader = DataStatesReader(self.kept["ours"])
            dcp.load(target, storage_reader=reader, no_dist=True)
            read = reader.last_read
            return {"engine": read.engine, "device_copies": read.device_copies, "copy_events": read.copy_events,
                    "pinned": read.pinned, "bytes_read": read.bytes_read, "framed": read.framed}

        return {RAW_READ: raw, STOCK_LOAD: stock, OURS_LOAD: ours}

    def time_load(self, method: str, load: Callable[[], dict[str, Any]]) -> None:
        from dcp_datastates import bench

        files_bytes = sum(p.stat().st_size for p in self.kept["ours"].iterdir() if p.suffix == ".distcp")
        row = self.row(method, "ceiling" if method == RAW_READ else "load", files_bytes if method == RAW_READ else self.total)
        if row.error is not None:
            return
        for value in self.target["model"].values():
            value.zero_()
        self.target["step"] = None
        self.settle()
        cold = bench.drop_caches()
        self.figures.cold_page_cache = cold and self.figures.cold_page_cache is not False
        try:
            start = time.perf_counter()
            stats = load()
            _synchronize(self.device)
            row.seconds.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001
            row.error = f"{type(exc).__name__}: {exc}"
            return
        if method != RAW_READ:
            wrong = [k for k, v in self.state["model"].items() if not bool((self.target["model"][k] == v).all())]
            exact = not wrong and self.target["step"] == self.state["step"]
            stats["exact"] = exact
            if not exact:
                row.error = f"loaded wrong values for {wrong[:3] or ['step']}"
                self.failed_loads.append(method)
        row.stats.update(stats)

    def run(self) -> int:
        self.figures.rows += copy_rate_rows(self.device, min(self.total, GiB))
        self.publish()
        self.warm_up()
        round_seconds: float | None = None
        while True:
            round_ = self.figures.rounds
            if round_ == (1 if self.opts.tiny else MAX_ROUNDS["bench"]):
                break
            if round_seconds is not None and self.clock.left() < 1.1 * round_seconds:
                self.figures.skipped.append(f"round {round_ + 1}: {self.clock.left():.0f} s left, a round took {round_seconds:.0f} s")
                break
            began = time.monotonic()
            saves = list(self.save_methods().items())
            for method, save in saves[round_ % len(saves) :] + saves[: round_ % len(saves)]:
                self.time_save(method, save, round_)
                self.publish()
            if "ours" not in self.kept or "stock" not in self.kept:
                self.figures.skipped.append("loads: no checkpoint of ours or of stock FileSystemWriter to load")
                self.publish()
                return 1
            loads = list(self.load_methods().items())
            for method, load in loads[round_ % len(loads) :] + loads[: round_ % len(loads)]:
                self.time_load(method, load)
                self.publish()
            self.figures.rounds += 1
            self.publish()
            round_seconds = time.monotonic() - began
            print(f"round {self.figures.rounds} took {round_seconds:.1f} s; {self.clock.left():.0f} s left", flush=True)
        self.stager.close()
        ours_saved = any(self.figures.row(ours_save(e)) and self.figures.row(ours_save(e)).seconds for e in OURS_ENGINES)  # type: ignore[union-attr]
        return 1 if self.failed_loads or not ours_saved else 0


def bench_phase(opts: argparse.Namespace) -> int:
    return BenchRun(opts).run()


# -- train -----------------------------------------------------------------------------------------------------
FULL_MODEL = dict(dim=2048, layers=18, heads=16, vocab=32000, seq=1024, batch=8, chunk="32MiB")  # 1.04B parameters
TINY_MODEL = dict(dim=32, layers=1, heads=4, vocab=64, seq=8, batch=2, chunk="1MiB")
STEPS, EVERY = 20, 5  # the loop the goals speak of; tiny runs take half the steps (two checkpoints)


def _hint_rates(path: Path | None, device: str) -> dict[str, float]:
    """Rates the bench phase measured on this machine (GiB/s), if it ran: ours, stock sync, stock async."""
    if path is None or not path.exists():
        return {}
    bench = BenchFigures.model_validate_json(path.read_text())
    if bench.device != device:
        return {}
    rates = {}
    ours = [r.gib_per_s for e in OURS_ENGINES if (r := bench.row(ours_save(e))) is not None and r.gib_per_s]
    if ours:
        rates["ours"] = min(ours)
    for key, method in (("stock sync", STOCK_SAVES[0]), ("stock async", STOCK_SAVES[1]), ("d2h", PINNED_D2H)):
        row = bench.row(method)
        if row is not None and row.gib_per_s:
            rates[key] = row.gib_per_s
    return rates


class TrainRun:
    def __init__(self, opts: argparse.Namespace) -> None:
        import torch

        from dcp_datastates import bench_training as bt

        self.bt, self.opts, self.clock = bt, opts, Clock(opts.budget_s)
        size = TINY_MODEL if opts.tiny else FULL_MODEL
        steps = STEPS // 2 if opts.tiny else STEPS
        self.args = argparse.Namespace(device=opts.device, dtype="bf16", steps=steps, every=EVERY, accum=1, pool="auto",
                                       keep=2, **size)
        self.params = bt.count_parameters(self.args)
        self.state_bytes = self.params * bt.state_bytes_per_parameter(bt.DTYPES["bf16"])
        self.figures = TrainFigures(device=opts.device, gpu_name=_gpu_name(opts.device), torch=torch.__version__,
                                    params=self.params, dtype="bf16", state_bytes=self.state_bytes, steps=steps,
                                    every=EVERY, **{k: v for k, v in size.items() if k != "chunk"})
        self.directory: Path = opts.dir

    def publish(self) -> None:
        publish(self.figures, self.opts.figures)

    def calibrate(self) -> tuple[float, float, float]:
        """(seconds to build the model and optimizer, one micro-batch, one optimizer step), measured untimed-ly."""
        import torch

        bt, args = self.bt, self.args
        start = time.perf_counter()
        model, optimizer = bt.build(args)
        _synchronize(args.device)
        build_s = time.perf_counter() - start
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device)
        for _ in range(2):  # warm-up: kernel selection, the allocator
            bt.forward_backward(model, tokens)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        micro, steps = [], []
        for _ in range(3):
            _synchronize(args.device)
            start = time.perf_counter()
            bt.forward_backward(model, tokens)
            _synchronize(args.device)
            micro.append(time.perf_counter() - start)
            start = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _synchronize(args.device)
            steps.append(time.perf_counter() - start)
        del model, optimizer, tokens
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return build_s, statistics.median(micro), statistics.median(steps)

    def plan(self) -> dict[str, float]:
        """Size the loop: 5 steps last ~1.1x one checkpoint write, shrunk if even none + ours would not fit."""
        from dcp_datastates import bench

        bt, args, state = self.bt, self.args, self.state_bytes
        args.keep = 2 if shutil.disk_usage(self.directory).free >= bt.disk_needed(state, 2) else 1
        bt.check_room(self.directory, state, bt.METHODS, args.keep)  # SystemExit naming what is short
        probe = (32 * MiB) if self.opts.tiny else GiB
        (self.directory / "probe").mkdir()
        disk = probe / bench.raw_o_direct(self.directory / "probe", probe) / GiB
        shutil.rmtree(self.directory / "probe")
        hints = _hint_rates(self.opts.hints, args.device)
        write_rate = hints.get("ours", 0.9 * disk)
        source = "bench phase (our slower engine)" if "ours" in hints else "0.9 x this phase's disk probe"
        write_s = state / GiB / write_rate
        build_s, micro_s, optimizer_s = self.calibrate()
        target = max(micro_s + optimizer_s, 1.1 * write_s / args.every)
        fixed = build_s + 2 * (micro_s + optimizer_s) + 1.0  # set-up and warm-up steps of every method

        def estimates(step_s: float) -> dict[str, float]:
            loop = fixed + args.steps * step_s
            checkpoints = args.steps // args.every
            stock_async = state / GiB / hints.get("stock async", 0.55 * disk)
            stock_sync = state / GiB / hints.get("stock sync", 0.45 * disk)
            stage = state / GiB / hints.get("d2h", 5.0)
            return {bt.METHODS[0]: loop, bt.METHODS[1]: loop + 2 * write_s,
                    bt.METHODS[2]: loop + stage + stock_async + (checkpoints - 1) * max(0.0, stock_async - args.every * step_s),
                    bt.METHODS[3]: loop + checkpoints * stock_sync}

        accum = max(1, math.ceil((target - optimizer_s) / micro_s))
        room = 0.9 * self.clock.left()
        first_two = lambda a: sum(list(estimates(a * micro_s + optimizer_s).values())[:2])  # noqa: E731
        while accum > 1 and first_two(accum) > room:  # a slow disk: shorter steps, so none and ours still fit
            accum -= 1
        args.accum = accum
        step_s = accum * micro_s + optimizer_s
        planned = estimates(step_s)
        self.figures.plan = TrainPlan(disk_gib_per_s=disk, write_gib_per_s=write_rate, rate_source=source,
                                      write_estimate_s=write_s, microbatch_s=micro_s, optimizer_step_s=optimizer_s,
                                      target_step_s=target, accum=accum, keep=args.keep, estimates_s=planned)
        self.publish()
        print(f"plan: {self.params / 1e9:.2f}B parameters, {state / GiB:.2f} GiB state, accum {accum} "
              f"({step_s:.2f} s/step), checkpoint write ~{write_s:.1f} s; estimates "
              + ", ".join(f"{m} {s:.0f} s" for m, s in planned.items()), flush=True)
        return planned

    def run_method(self, method: str) -> float:
        import torch

        bt = self.bt
        began = time.monotonic()
        result = bt.RunResult(method)
        bt.train(method, self.args, self.directory, result)
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir()
        if self.args.device == "cuda":
            torch.cuda.empty_cache()  # the next method starts from the same free GPU memory
        figures = self.figures.method(method)
        if figures is None:
            figures = MethodFigures(method=method)
            self.figures.methods.append(figures)
        figures.steps_seconds += result.steps_seconds
        figures.drain_seconds += result.drain_seconds
        figures.total_seconds += result.seconds
        figures.stalls_s += result.stalls
        self.publish()
        seconds = time.monotonic() - began
        stalls = ", ".join(f"{s * 1000:.0f}" for s in result.stalls)
        print(f"{method}: loop {result.steps_seconds[-1]:.2f} s, drain {result.drain_seconds[-1]:.2f} s, "
              f"stalls [{stalls}] ms; {seconds:.0f} s with set-up", flush=True)
        return seconds

    def run(self) -> int:
        estimates = self.plan()
        keys = self.opts.methods.split(",")
        methods = [m for k, m in self.bt.METHOD_KEYS.items() if k in keys]  # priority: none, ours, stock async, sync
        measured: dict[str, float] = {}
        for method in methods:
            if self.clock.left() < 1.1 * estimates[method]:
                self.figures.skipped.append(SkippedMethod(
                    method=method, estimate_s=estimates[method],
                    reason=f"budget: {self.clock.left():.0f} s left, estimated {estimates[method]:.0f} s"))
                self.publish()
                continue
            measured[method] = self.run_method(method)
        repeat = 1
        rounds = 1 if self.opts.tiny else MAX_ROUNDS["train"]
        while repeat < rounds and measured and self.clock.left() > 1.1 * sum(measured.values()):  # the order rotated
            order = list(measured)
            for method in order[repeat % len(order) :] + order[: repeat % len(order)]:
                self.run_method(method)
            repeat += 1
        return 0 if self.figures.methods else 1


def train_phase(opts: argparse.Namespace) -> int:
    return TrainRun(opts).run()


# -- entry point --------------------------------------------------------------------------------------------------
PHASE_MAIN: dict[str, Callable[[argparse.Namespace], int]] = {"tests": tests_phase, "bench": bench_phase, "train": train_phase}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcp_datastates.gpu_proof_phases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=sorted(PHASE_MAIN))
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--figures", type=Path, required=True, help="where this phase's figures go (JSON)")
    parser.add_argument("--dir", type=Path, required=True, help="scratch directory on the disk to measure")
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--tests-dir", type=Path, default=Path("tests"))
    parser.add_argument("--hints", type=Path, default=None, help="the bench phase's figures (rates for the train plan)")
    parser.add_argument("--methods", default="none,datastates,stock-async,stock-sync",
                        help="train: comma-separated keys of bench_training.METHOD_KEYS")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("numba").setLevel(logging.WARNING)
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda, but torch sees no CUDA device", flush=True)
            return 2
    print(f"phase {opts.phase} on {opts.device}{' (tiny)' if opts.tiny else ''}: plan for {opts.budget_s:.0f} s",
          flush=True)
    return PHASE_MAIN[opts.phase](opts)


if __name__ == "__main__":
    code = main()
    # The figures are published: interpreter teardown (freeing pinned pools, the CUDA context) only
    # costs seconds that belong to the next phase.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
