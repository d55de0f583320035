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
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from dcp_datastates.config import DataStatesConfig
from dcp_datastates.writer import DataStatesWriter

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
GiB = 1024**3


@dataclass
class Row:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


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


def raw_o_direct(directory: Path, size_bytes: int, chunk: int = 32 * 1024**2, depth: int = 8) -> float:
    """The ceiling: pre-filled aligned buffers written O_DIRECT, ``depth`` writes in flight, then fsync.

    Same request size and queue depth as DataStatesWriter's defaults, so the row measures the disk
    under the access pattern we use, with no checkpoint logic (a single in-flight write under-reads
    virtual disks that parallelise requests).
    """
    buffer = mmap.mmap(-1, chunk)
    buffer.write(os.urandom(1024**2) * (chunk // 1024**2))
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
        print(f"torch_checkpointing not measured: {exc} (pip install --no-deps torch-checkpointing==0.1.1)")
        return None
    config = CheckpointManager.Config.with_async_save() if asynchronous else CheckpointManager.Config.with_sync_save()
    config.storage_config = LocalFileSystemStorageConfig(use_direct_io=False)
    return config.build()


def run(size_gib: float, directory: Path, repeats: int, device: str) -> tuple[list[Row], int]:
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

    def tcp_save(manager) -> Callable[[Path], None]:  # type: ignore[no-untyped-def]
        def save(path: Path) -> None:
            path.mkdir()
            future = manager.save(str(path), state)
            if future is not None:
                future.result()  # durable: torch_checkpointing's write future

        return save

    methods: dict[str, Callable[[Path], float]] = {
        "raw O_DIRECT (ceiling)": lambda d: raw_o_direct(d, total),
        "stock FileSystemWriter (8 threads)": lambda d: timed(stock_fs, d),
        "stock async_save + DefaultStager": lambda d: timed(stock_async, d),
        "DataStatesWriter io_uring": lambda d: timed(ours("io_uring"), d),
        "DataStatesWriter io_uring, no checksums": lambda d: timed(ours("io_uring", checksums=False), d),
        "DataStatesWriter threads": lambda d: timed(ours("threads"), d),
    }
    if tcp_sync is not None and tcp_async is not None:
        methods["torch_checkpointing sync save"] = lambda d: timed(tcp_save(tcp_sync), d)
        methods["torch_checkpointing async save"] = lambda d: timed(tcp_save(tcp_async), d)
        timed(tcp_save(tcp_async), directory)  # warm-up: starts its writer process once
    rows = {name: Row(name, []) for name in methods}
    timed(ours("io_uring"), directory)  # warm-up: allocates the pool once, as a training job would
    names = list(methods)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotate who goes first
            settle()
            rows[name].seconds.append(methods[name](directory))
    for manager in (tcp_sync, tcp_async):
        if manager is not None:
            manager.close()
    return list(rows.values()), total


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
    }
    if tcp is not None:
        tcp_dir.mkdir()
        tcp.save(str(tcp_dir), state)

        def tcp_load() -> None:
            loaded = tcp.load(str(tcp_dir), target)
            target["step"] = loaded["step"]

        methods["torch_checkpointing load"] = tcp_load
    ceiling = "raw O_DIRECT read, QD 8 (ceiling)"
    rows = {name: Row(name, []) for name in [ceiling, *methods]}
    methods[next(iter(methods))]()  # warm-up of code paths (numba kernels, pools), not of the page cache
    methods["DataStatesReader"]()
    cold = True
    names = list(rows)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            _zero(target)
            settle()
            cold = drop_caches() and cold
            if name == ceiling:
                rows[name].seconds.append(raw_o_direct_read(files, depth=8))
                continue
            start = time.perf_counter()
            methods[name]()
            rows[name].seconds.append(time.perf_counter() - start)
            _check(target, state, name)
    if tcp is not None:
        tcp.close()
    for path in (ours_dir, stock_dir, tcp_dir):
        shutil.rmtree(path, ignore_errors=True)
    return list(rows.values()), total, cold


def print_load_table(title: str, rows: list[Row], total: int, cold: bool) -> None:
    by_name = {r.name: r for r in rows}
    ceiling = total / rows[0].median
    stock = total / by_name["stock FileSystemReader"].median
    cache = "cold page cache (dropped before every run)" if cold else "WARM page cache (drop_caches not permitted)"
    print(f"\nload, {title}: {total / GiB:.2f} GiB of tensors; {cache}; median of {len(rows[0].seconds)} runs, round-robin")
    print(f"{'method':<42}{'seconds':>9}{'GiB/s':>8}{'(range)':>14}{'vs stock FS':>13}{'of ceiling':>12}")
    for row in rows:
        rate = total / row.median
        print(f"{_row_cells(row, total)}{rate / stock:>12.2f}x{rate / ceiling:>11.0%}")


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
    verify_checkpoint(target)  # warm-up: numba kernels load once per process
    for _ in range(repeats):
        settle()
        rows["raw O_DIRECT read (ceiling)"].seconds.append(raw_o_direct_read(files))
        settle()
        report = verify_checkpoint(target)
        assert report.ok, report.problems
        rows["dcp-datastates verify"].seconds.append(report.seconds)
    shutil.rmtree(target)
    return list(rows.values()), total


def _row_cells(row: Row, total: int) -> str:
    rate = total / row.median
    spread = f"{total / max(row.seconds) / GiB:.2f}-{total / min(row.seconds) / GiB:.2f}"
    return f"{row.name:<42}{row.median:>9.2f}{rate / GiB:>8.2f}{spread:>14}"


def as_json(rows: list[Row], total: int) -> dict:
    return {"bytes": total, "rows": [{"method": r.name, "seconds": r.seconds, "median_seconds": r.median,
                                       "median_gib_per_s": total / r.median / GiB} for r in rows]}


def print_verify_table(rows: list[Row], total: int) -> None:
    ceiling = total / rows[0].median
    print(f"\nverify: {total / GiB:.2f} GiB of data files; median of {len(rows[0].seconds)} runs each, alternating")
    print(f"{'method':<42}{'seconds':>9}{'GiB/s':>8}{'(range)':>14}{'of ceiling':>12}")
    for row in rows:
        print(f"{_row_cells(row, total)}{total / row.median / ceiling:>11.0%}")


def print_table(rows: list[Row], total: int, device: str) -> None:
    by_name = {r.name: r for r in rows}
    ceiling = total / by_name["raw O_DIRECT (ceiling)"].median
    stock = total / by_name["stock FileSystemWriter (8 threads)"].median
    print(f"state: {total / GiB:.2f} GiB on {device}; median of {len(rows[0].seconds)} runs each, round-robin")
    print(f"{'method':<42}{'seconds':>9}{'GiB/s':>8}{'(range)':>14}{'vs stock FS':>13}{'of ceiling':>12}")
    for row in rows:
        rate = total / row.median
        print(f"{_row_cells(row, total)}{rate / stock:>12.2f}x{rate / ceiling:>11.0%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dcp_datastates.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-verify", action="store_true", help="skip the read-side (verify) table")
    parser.add_argument("--skip-load", action="store_true", help="skip the load tables")
    parser.add_argument("--small-tensors", type=int, default=None,
                        help="tensors in the many-small-tensors load table (default 50000, 1000 below 1 GiB)")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON instead of tables")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="dcp_datastates_bench_", dir=args.dir))
    try:
        rows, total = run(args.size_gib, directory, args.repeats, args.device)
        report = {"device": args.device, "save": as_json(rows, total)}
        if not args.json:
            print_table(rows, total, args.device)
        if not args.skip_verify:
            verify_rows, verify_total = run_verify(args.size_gib, directory, args.repeats)
            report["verify"] = as_json(verify_rows, verify_total)
            if not args.json:
                print_verify_table(verify_rows, verify_total)
        if not args.skip_load:
            small = args.small_tensors if args.small_tensors is not None else (50_000 if args.size_gib >= 1 else 1000)
            for key, title, state in (("load", "LLM-like state", lambda: make_state(int(args.size_gib * GiB), "cpu")),
                                      ("load_small", f"{small} small tensors", lambda: make_small_state(small))):
                load_rows, load_total, cold = run_load(state(), directory, args.repeats)
                report[key] = as_json(load_rows, load_total) | {"cold_page_cache": cold}
                if not args.json:
                    print_load_table(title, load_rows, load_total, cold)
        if args.json:
            print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
