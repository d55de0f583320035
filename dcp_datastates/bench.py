"""Save and load benchmark: DataStatesWriter/Reader vs stock DCP (and Meta's torch_checkpointing), side by side in one run.

    python -m dcp_datastates.bench --size-gib 2 --dir /path/on/the/disk/to/test

Rows: the raw O_DIRECT ceiling of the disk (pwrite of pre-filled aligned 32 MiB buffers,
8 in flight, no checkpoint logic), stock ``FileSystemWriter`` (8 threads), stock ``async_save`` with
``DefaultStager`` (time until the upload completes), and ``DataStatesWriter`` with each
engine (and with checksums off, to show what they cost). A second table times
``dcp-datastates verify`` against reading the same files with O_DIRECT. Load tables (the LLM-like state,
and many small tensors) time the raw O_DIRECT read ceiling (32 MiB reads, 8 in flight), stock
``FileSystemReader``, ``DataStatesReader`` with checksums on and off, and torch_checkpointing's
load, each from a cold page cache (caches dropped before every run where permitted). Methods run round-robin (the order rotating each round), ``--repeats`` times, and each
row reports its median and range, so a disk whose speed drifts during the run (shared
cloud disks do) affects every row alike. Every save includes its
fsyncs. With ``--device cuda`` the state lives on the GPU (what training checkpoints).

Every row also reports the CPU seconds it cost per GiB (the whole process tree, every thread,
kernel time included: see ``bench_cpu``) -- the cost a checkpoint imposes on a training node
whose cores are never idle. ``--busy`` starts one CPU-burning process per core beside the
benchmark for the whole measurement (stopped when it ends, on errors and on Ctrl-C too), so
the rows show what each method achieves when it must compete for the cores. A table of many
small tensors (``--small-tensors``, 16 floats each) times saving them too. ``--json`` prints
the measurements as one JSON document on standard output and nothing else (every notice goes
to standard error).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from dcp_datastates.bench_cpu import CpuClock, busy_cores, core_count
from dcp_datastates.config import DataStatesConfig
from dcp_datastates.planner import DataStatesLoadPlanner, DataStatesSavePlanner
from dcp_datastates.writer import DataStatesWriter

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
GiB = 1024**3


@dataclass
class Row:
    name: str
    seconds: list[float]
    #: CPU seconds of each run (the process tree; see ``bench_cpu``), in the order of ``seconds``.
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else float("nan")


#: Measures the CPU of every run; ``main`` replaces it with one that leaves the busy-machine burners out.
_clock = CpuClock()


@contextlib.contextmanager
def measuring(row: Row) -> Iterator[None]:
    """Append the wall-clock and CPU seconds of the block to ``row``."""
    cpu = _clock.sample()
    start = time.perf_counter()
    yield
    row.seconds.append(time.perf_counter() - start)
    row.cpu_seconds.append(CpuClock.between(cpu, _clock.sample()))


def notice(message: str) -> None:
    """A line for the person running the benchmark: standard error, so ``--json`` output stays JSON."""
    print(message, file=sys.stderr)


def make_state(size_bytes: int, device: str) -> dict:
    """An LLM-like mix: large matrices plus many small norms and biases, and a step counter.

    Nested like a real training state (``{"model": {...}, "step": n}``): DCP's per-top-level-key
    overhead would otherwise dominate and hide the storage layer being measured.
    """
    model: dict = {}
    small, i = 0, 0
    while small < size_bytes // 50:  # ~2% of bytes in hundreds of small tensors
        model[f"layers.{i}.norm.weight"] = torch.randn(4096, device=device)
        small += 4096 * 4
        i += 1
    big = size_bytes - small
    per_tensor = 64 * 1024**2
    for j in range(max(1, big // per_tensor)):
        model[f"layers.{j}.mlp.weight"] = torch.randn(per_tensor // 4, device=device)
    return {"model": model, "step": 1000}


def state_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state["model"].values())


def raw_o_direct(directory: Path, size_bytes: int, chunk: int = 32 * 1024**2, depth: int = 8,
                 buffer: mmap.mmap | None = None) -> float:
    """The ceiling: pre-filled aligned buffers written O_DIRECT, ``depth`` writes in flight, then fsync.

    Same request size and queue depth as DataStatesWriter's defaults, so the row measures the disk
    under the access pattern we use, with no checkpoint logic (a single in-flight write under-reads
    virtual disks that parallelise requests). ``buffer`` (``chunk`` bytes): filled already, so that
    preparing it is not charged to the ceiling's CPU time.
    """
    if buffer is None:
        buffer = ceiling_buffer(chunk)
    path = directory / "raw.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=depth) as pool:
        list(pool.map(lambda offset: os.pwrite(fd, buffer, offset), range(0, size_bytes, chunk)))
    os.fsync(fd)
    elapsed = time.perf_counter() - start
    os.close(fd)
    path.unlink()
    return elapsed


def ceiling_buffer(chunk: int = 32 * 1024**2) -> mmap.mmap:
    """A page-aligned buffer of random bytes for ``raw_o_direct``."""
    buffer = mmap.mmap(-1, chunk)
    buffer.write(os.urandom(1024**2) * (chunk // 1024**2))
    return buffer


def raw_o_direct_read(files: list[Path], chunk: int = 32 * 1024**2, depth: int = 1) -> float:
    """The read ceiling: the same files read with O_DIRECT, ``depth`` reads in flight, nothing else done."""
    if depth > 1:
        buffers = [mmap.mmap(-1, chunk) for _ in range(depth)]
        fds = [os.open(path, os.O_RDONLY | os.O_DIRECT) for path in files]
        jobs = [(fd, offset) for fd, path in zip(fds, files) for offset in range(0, path.stat().st_size, chunk)]
        free = list(range(depth))

        def read(job: tuple[int, int]) -> int:
            slot = free.pop()  # list.pop/append are atomic: each worker holds its own buffer
            try:
                return os.preadv(job[0], [buffers[slot]], job[1])
            finally:
                free.append(slot)

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=depth) as pool:
            list(pool.map(read, jobs))
        elapsed = time.perf_counter() - start
        for fd in fds:
            os.close(fd)
        return elapsed
    buffer = mmap.mmap(-1, chunk)
    start = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        offset = 0
        while (got := os.preadv(fd, [buffer], offset)) > 0:
            offset += got
        os.close(fd)
    return time.perf_counter() - start


def timed(save: Callable[[Path], None], directory: Path) -> float:
    target = directory / "ckpt"
    start = time.perf_counter()
    save(target)
    elapsed = time.perf_counter() - start
    shutil.rmtree(target)
    return elapsed


def settle() -> None:
    """Let the previous run's deletes and writeback finish outside the next run's clock."""
    os.sync()
    time.sleep(1.0)


def drop_caches() -> bool:
    """Empty the page cache so a load reads from the disk (needs root); False where not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def torch_checkpointing_manager(asynchronous: bool):  # type: ignore[no-untyped-def]
    """Meta's torch_checkpointing CheckpointManager, or None (with the reason printed) where it cannot run.

    Its local storage opens files O_DIRECT by default and hands them torch.save's unaligned
    writes, which ext4 refuses with EINVAL (as on this machine); buffered files are its
    documented alternative (``LocalFileSystemStorageConfig(use_direct_io=False)``).
    """
    try:
        from torch_checkpointing import CheckpointManager
        from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig
    except ImportError as exc:
        notice(f"torch_checkpointing not measured: {exc} (pip install --no-deps torch-checkpointing==0.1.1)")
        return None
    config = CheckpointManager.Config.with_async_save() if asynchronous else CheckpointManager.Config.with_sync_save()
    config.storage_config = LocalFileSystemStorageConfig(use_direct_io=False)
    return config.build()


def run(size_gib: float, directory: Path, repeats: int, device: str) -> tuple[list[Row], int]:
    """The save table: every method round-robin, ``repeats`` times; wall-clock and CPU seconds of each run."""
    state = make_state(int(size_gib * GiB), device)
    total = state_bytes(state)
    config = DataStatesConfig()  # the defaults users get (host_pool_bytes="auto": sized to the state)

    def stock_fs(path: Path) -> None:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, thread_count=8), no_dist=True)

    def stock_async(path: Path) -> None:
        pinned = device == "cuda"
        stager = DefaultStager(StagingOptions(pinned, pinned, pinned, pinned))
        try:
            response = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(path, thread_count=8), async_stager=stager, no_dist=True)
            (response.upload_completion if hasattr(response, "upload_completion") else response).result()
        finally:
            stager.close()

    def ours(engine: str, checksums: bool = True) -> Callable[[Path], None]:
        engine_config = config.model_copy(update={"io_engine": engine, "checksums": checksums})

        def save(path: Path) -> None:
            dcp.save(state, storage_writer=DataStatesWriter(path, engine_config), no_dist=True)

        return save

    tcp_sync, tcp_async = torch_checkpointing_manager(False), torch_checkpointing_manager(True)
    buffer = ceiling_buffer()

    def ceiling(path: Path) -> None:
        path.mkdir()
        raw_o_direct(path, total, buffer=buffer)

    methods: dict[str, Callable[[Path], None]] = {
        "raw O_DIRECT (ceiling)": ceiling,
        "stock FileSystemWriter (8 threads)": stock_fs,
        "stock async_save + DefaultStager": stock_async,
        "DataStatesWriter io_uring": ours("io_uring"),
        "DataStatesWriter io_uring, no checksums": ours("io_uring", checksums=False),
        "DataStatesWriter threads": ours("threads"),
    }
    if tcp_sync is not None and tcp_async is not None:
        try:
            timed(_tcp_save(tcp_async, state), directory)  # warm-up: starts its writer process once
        except Exception as exc:  # noqa: BLE001 - e.g. its writer process does not start in its 30 s on a busy machine
            notice(f"torch_checkpointing not measured: its warm-up save failed ({type(exc).__name__}: {exc})")
            shutil.rmtree(directory / "ckpt", ignore_errors=True)
        else:
            methods["torch_checkpointing sync save"] = _tcp_save(tcp_sync, state)
            methods["torch_checkpointing async save"] = _tcp_save(tcp_async, state)
    timed(ours("io_uring"), directory)  # warm-up: allocates the pool once, as a training job would
    try:
        rows = _round_robin(methods, directory, repeats)
    finally:
        for manager in (tcp_sync, tcp_async):
            if manager is not None:
                manager.close()
    return rows, total


def _tcp_save(manager, state: dict) -> Callable[[Path], None]:  # type: ignore[no-untyped-def]
    def save(path: Path) -> None:
        path.mkdir()
        future = manager.save(str(path), state)
        if future is not None:
            future.result()  # durable: torch_checkpointing's write future

    return save


def _round_robin(methods: dict[str, Callable[[Path], None]], directory: Path, repeats: int) -> list[Row]:
    """Run each save method ``repeats`` times, rotating who goes first; each run into a fresh directory."""
    rows = {name: Row(name, []) for name in methods}
    names = list(methods)
    target = directory / "ckpt"
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotate who goes first
            settle()
            with measuring(rows[name]):
                methods[name](target)
            shutil.rmtree(target)
    return list(rows.values())


def run_small_save(count: int, directory: Path, repeats: int) -> tuple[list[Row], int]:
    """Saving ``count`` tensors of 16 floats: per-record overhead (planning, framing, small writes), not bandwidth."""
    state = make_small_state(count)
    total = sum(v.numel() * v.element_size() for v in state["model"].values())
    tcp = torch_checkpointing_manager(False)
    methods: dict[str, Callable[[Path], None]] = {
        "stock FileSystemWriter": lambda path: dcp.save(state, storage_writer=dcp.FileSystemWriter(path), no_dist=True),
        "stock FileSystemWriter (8 threads)": lambda path: dcp.save(
            state, storage_writer=dcp.FileSystemWriter(path, thread_count=8), no_dist=True),
        "DataStatesWriter": lambda path: dcp.save(state, storage_writer=DataStatesWriter(path), no_dist=True),
        "DataStatesWriter, no checksums": lambda path: dcp.save(
            state, storage_writer=DataStatesWriter(path, DataStatesConfig(checksums=False)), no_dist=True),
        "DataStatesWriter + DataStatesSavePlanner": lambda path: dcp.save(
            state, storage_writer=DataStatesWriter(path), planner=DataStatesSavePlanner(), no_dist=True),
    }
    if tcp is not None:
        methods["torch_checkpointing sync save"] = _tcp_save(tcp, state)
    try:
        for save in methods.values():  # warm-up of code paths and of the plan cache a training job would have
            timed(save, directory)
        return _round_robin(methods, directory, repeats), total
    finally:
        if tcp is not None:
            tcp.close()


def make_small_state(count: int) -> dict:
    """Many small tensors (16 floats each): per-record overhead, not bandwidth, decides the load time."""
    g = torch.Generator().manual_seed(0)
    return {"model": {f"layers.{i}.bias": torch.randn(16, generator=g) for i in range(count)}, "step": 1000}


def _blank(state: dict) -> dict:
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "step": None}


def _zero(target: dict) -> None:
    for value in target["model"].values():
        value.zero_()
    target["step"] = None


def _check(target: dict, state: dict, method: str) -> None:
    wrong = [k for k, v in state["model"].items() if not torch.equal(target["model"][k], v)]
    if wrong or target["step"] != state["step"]:
        raise AssertionError(f"{method} loaded wrong values for {wrong[:3] or ['step']}")


def run_load(state: dict, directory: Path, repeats: int) -> tuple[list[Row], int, bool]:
    """Load the same state saved by each method, from a cold page cache, round-robin; every load checked exact."""
    from dcp_datastates.reader import DataStatesReader

    ours_dir, stock_dir, tcp_dir = directory / "ours", directory / "stock", directory / "tcp"
    dcp.save(state, storage_writer=DataStatesWriter(ours_dir), no_dist=True)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(stock_dir, thread_count=8), no_dist=True)
    files = sorted(p for p in ours_dir.iterdir() if p.suffix == ".distcp")
    total = sum(v.numel() * v.element_size() for v in state["model"].values())
    target = _blank(state)
    tcp = torch_checkpointing_manager(False)
    methods: dict[str, Callable[[], None]] = {
        "stock FileSystemReader": lambda: dcp.load(target, storage_reader=dcp.FileSystemReader(stock_dir), no_dist=True),
        "DataStatesReader": lambda: dcp.load(target, storage_reader=DataStatesReader(ours_dir), no_dist=True),
        "DataStatesReader, checksums off": lambda: dcp.load(
            target, storage_reader=DataStatesReader(ours_dir, verify_checksums=False), no_dist=True),
        "DataStatesReader + DataStatesLoadPlanner": lambda: dcp.load(
            target, storage_reader=DataStatesReader(ours_dir), planner=DataStatesLoadPlanner(), no_dist=True),
    }
    try:
        if tcp is not None:
            tcp_dir.mkdir()
            tcp.save(str(tcp_dir), state)

            def tcp_load() -> None:
                loaded = tcp.load(str(tcp_dir), target)
                target["step"] = loaded["step"]

            methods["torch_checkpointing load"] = tcp_load
        ceiling = "raw O_DIRECT read, QD 8 (ceiling)"
        methods = {ceiling: lambda: None, **methods}
        rows = {name: Row(name, []) for name in methods}
        for name, load in methods.items():  # warm-up of code paths (numba kernels, pools), not of the page cache
            if name != ceiling:
                load()
        cold = True
        names = list(rows)
        for repeat in range(repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                _zero(target)
                settle()
                cold = drop_caches() and cold
                if name == ceiling:
                    with measuring(rows[name]):
                        raw_o_direct_read(files, depth=8)
                    continue
                with measuring(rows[name]):
                    methods[name]()
                _check(target, state, name)
    finally:
        if tcp is not None:
            tcp.close()
        for path in (ours_dir, stock_dir, tcp_dir):
            shutil.rmtree(path, ignore_errors=True)
    return list(rows.values()), total, cold


def print_load_table(title: str, rows: list[Row], total: int, cold: bool) -> None:
    by_name = {r.name: r for r in rows}
    cache = "cold page cache (dropped before every run)" if cold else "WARM page cache (drop_caches not permitted)"
    print(f"\nload, {title}: {total / GiB:.4g} GiB of tensors; {cache}; median of {len(rows[0].seconds)} runs, round-robin")
    _print_rows(rows, total, rows[0], by_name["stock FileSystemReader"])


def run_verify(size_gib: float, directory: Path, repeats: int) -> tuple[list[Row], int]:
    """Read side: `verify` (every byte checksummed) vs reading the same files with O_DIRECT."""
    from dcp_datastates.verify import verify_checkpoint

    state = make_state(int(size_gib * GiB), "cpu")
    target = directory / "verify_ckpt"
    dcp.save(state, storage_writer=DataStatesWriter(target), no_dist=True)
    del state
    files = sorted(p for p in target.iterdir() if p.suffix == ".distcp")
    total = sum(p.stat().st_size for p in files)
    rows = {"raw O_DIRECT read (ceiling)": Row("raw O_DIRECT read (ceiling)", []), "dcp-datastates verify": Row("dcp-datastates verify", [])}
    verify_checkpoint(target)  # warm-up: kernels load once per process
    for _ in range(repeats):
        settle()
        with measuring(rows["raw O_DIRECT read (ceiling)"]):
            raw_o_direct_read(files)
        settle()
        with measuring(rows["dcp-datastates verify"]):
            report = verify_checkpoint(target)
        assert report.ok, report.problems
    shutil.rmtree(target)
    return list(rows.values()), total


def _row_cells(row: Row, total: int) -> str:
    rate = total / row.median
    spread = f"{total / max(row.seconds) / GiB:.2f}-{total / min(row.seconds) / GiB:.2f}"
    return f"{row.name:<42}{row.median:>9.2f}{rate / GiB:>8.2f}{spread:>14}{row.median_cpu / (total / GiB):>11.2f}"


def _header(*extra: str) -> str:
    return f"{'method':<42}{'seconds':>9}{'GiB/s':>8}{'(range)':>14}{'CPU s/GiB':>11}" + "".join(f"{e:>13}" for e in extra)


def _print_rows(rows: list[Row], total: int, ceiling: Row | None, stock: Row) -> None:
    """One line per row: time, rate and CPU, and each relative to stock (and to the ceiling)."""
    print(_header("vs stock", "CPU vs stock", *(["of ceiling"] if ceiling is not None else [])))
    for row in rows:
        line = f"{_row_cells(row, total)}{stock.median / row.median:>12.2f}x{row.median_cpu / stock.median_cpu:>12.2f}x"
        if ceiling is not None:
            line += f"{ceiling.median / row.median:>13.0%}"
        print(line)


def as_json(rows: list[Row], total: int) -> dict:
    return {"bytes": total, "rows": [{"method": r.name, "seconds": r.seconds, "median_seconds": r.median,
                                       "median_gib_per_s": total / r.median / GiB, "cpu_seconds": r.cpu_seconds,
                                       "median_cpu_seconds": r.median_cpu,
                                       "cpu_seconds_per_gib": r.median_cpu / (total / GiB)} for r in rows]}


def print_verify_table(rows: list[Row], total: int) -> None:
    print(f"\nverify: {total / GiB:.2f} GiB of data files; median of {len(rows[0].seconds)} runs each, alternating")
    print(_header("of ceiling"))
    for row in rows:
        print(f"{_row_cells(row, total)}{rows[0].median / row.median:>13.0%}")


def print_table(rows: list[Row], total: int, device: str) -> None:
    by_name = {r.name: r for r in rows}
    print(f"state: {total / GiB:.2f} GiB on {device}; median of {len(rows[0].seconds)} runs each, round-robin")
    _print_rows(rows, total, by_name["raw O_DIRECT (ceiling)"], by_name["stock FileSystemWriter (8 threads)"])


def print_small_save_table(rows: list[Row], total: int, count: int) -> None:
    print(f"\nsave, {count} small tensors: {total / GiB:.4g} GiB of tensors; median of {len(rows[0].seconds)} runs, round-robin")
    _print_rows(rows, total, None, rows[0])


def machine_line(busy: bool) -> str:
    """What the numbers were measured under: cores, load average, burners."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    burners = f"; --busy: {core_count()} CPU-burning processes beside the benchmark" if busy else ""
    return f"{core_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start{burners}"


def measure(args: argparse.Namespace, directory: Path, printing: bool) -> dict:
    """Every table ``args`` asks for; printed as it is measured unless ``printing`` is off."""
    report: dict = {"device": args.device, "busy": args.busy, "machine": machine_line(args.busy)}
    if printing:
        print(report["machine"])
    rows, total = run(args.size_gib, directory, args.repeats, args.device)
    report["save"] = as_json(rows, total)
    if printing:
        print_table(rows, total, args.device)
    if not args.skip_verify:
        verify_rows, verify_total = run_verify(args.size_gib, directory, args.repeats)
        report["verify"] = as_json(verify_rows, verify_total)
        if printing:
            print_verify_table(verify_rows, verify_total)
    small = args.small_tensors if args.small_tensors is not None else (50_000 if args.size_gib >= 1 else 1000)
    if not args.skip_small:
        small_rows, small_total = run_small_save(small, directory, args.repeats)
        report["save_small"] = as_json(small_rows, small_total) | {"tensors": small}
        if printing:
            print_small_save_table(small_rows, small_total, small)
    if not args.skip_load:
        for key, title, state in (("load", "LLM-like state", lambda: make_state(int(args.size_gib * GiB), "cpu")),
                                  ("load_small", f"{small} small tensors", lambda: make_small_state(small))):
            if key == "load_small" and args.skip_small:
                continue
            load_rows, load_total, cold = run_load(state(), directory, args.repeats)
            report[key] = as_json(load_rows, load_total) | {"cold_page_cache": cold}
            if printing:
                print_load_table(title, load_rows, load_total, cold)
    return report


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While measuring for ``--json``: everything written to standard output -- by Python, C code or a
    child process -- goes to standard error (the JSON is printed once it is restored)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> None:
    global _clock
    parser = argparse.ArgumentParser(prog="python -m dcp_datastates.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-verify", action="store_true", help="skip the read-side (verify) table")
    parser.add_argument("--skip-load", action="store_true", help="skip the load tables")
    parser.add_argument("--skip-small", action="store_true", help="skip the many-small-tensors save and load tables")
    parser.add_argument("--small-tensors", type=int, default=None,
                        help="tensors in the many-small-tensors tables (default 50000, 1000 below 1 GiB)")
    parser.add_argument("--busy", action="store_true",
                        help="run one CPU-burning process per core beside the benchmark while it measures")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON (alone) instead of tables")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="dcp_datastates_bench_", dir=args.dir))
    previous = signal.getsignal(signal.SIGTERM)
    if threading_is_main():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)  # clean up (burners, temp files) when killed politely
    try:
        with _stdout_to_stderr() if args.json else contextlib.nullcontext(), \
                busy_cores() if args.busy else contextlib.nullcontext(frozenset()) as burners:
            _clock = CpuClock(exclude=burners)
            report = measure(args, directory, printing=not args.json)
        if args.json:
            print(json.dumps(report, indent=2))
    finally:
        _clock = CpuClock()
        if threading_is_main():
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(directory, ignore_errors=True)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
