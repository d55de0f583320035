"""Benchmark: one tier vs two, and restores from local, partner and shared copies, side by side in one run.

    python -m dcp_datastates.bench_multilevel [--mib 64] [--repeats 3] [--dir /tmp/bench] [--nodes 2]

Launches itself under torchrun on one machine: ``--nodes`` ranks, each its own simulated
node (``DCP_DATASTATES_NODE``), gloo on CPU. Per rank ``--mib`` MiB of float32 state.

* **save call**: how long ``dcp.async_save`` blocks the training loop;
* **save wall**: until ``upload_completion`` (one tier: committed on the shared path; two
  tiers: committed in the coordinator node's local directory, the others' follow);
* **all tiers**: two tiers only -- until every local and partner copy is committed and the
  drain to the shared path is done (``flush_tiers``);
* **restore**: ``restore()`` with every copy local, with node 1's local disk gone (its
  files fetched from the partner copy over the process group), and from the shared path.

On one machine "local" and "shared" directories are on the same disk, so these figures show
the tiers' own overhead (extra copies, the partner transfer over loopback, the drain) --
not the bandwidth gap between NVMe and a parallel file system that the tiers exist for.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dcp_datastates.bench_multilevel", description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=64, help="state per rank, MiB (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="saves and restores per configuration (median reported)")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    p.add_argument("--nodes", type=int, default=2, help="simulated nodes = ranks (default 2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if "RANK" in os.environ:
        return _run(args)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_multilevel_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nodes}",
           "-m", "dcp_datastates.bench_multilevel", "--mib", str(args.mib), "--repeats", str(args.repeats),
           "--dir", str(work), "--nodes", str(args.nodes)]
    try:
        return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ["DCP_DATASTATES_NODE"] = f"n{os.environ['RANK']}"
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from dcp_datastates import DataStatesConfig, DataStatesWriter, MultiLevelConfig, flush_tiers, restore

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group(backend="gloo")
    work = Path(args.dir)
    numel = args.mib * 2**18
    g = torch.Generator().manual_seed(rank)
    state = {f"rank{rank}.w{i}": torch.randn(numel // 4, generator=g) for i in range(4)} | {"step": 0}
    plain = DataStatesConfig(io_engine="threads")
    tiers = DataStatesConfig(io_engine="threads", multilevel=MultiLevelConfig(local_dir=f"{work}/local/{{node}}",
                                                                                partners=1, keep_local=2))
    rows: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        rows.setdefault(name, []).append(seconds)

    def timed_save(path: Path, config: DataStatesConfig, label: str) -> None:
        dist.barrier()
        start = time.perf_counter()
        response = dcp.async_save(state, storage_writer=DataStatesWriter(path, config, overwrite=True), process_group=group)
        record(f"{label}: save call", time.perf_counter() - start)
        response.upload_completion.result()
        record(f"{label}: save wall", time.perf_counter() - start)
        if config.multilevel is not None:
            assert flush_tiers(600)
            dist.barrier()
            record(f"{label}: all tiers done", time.perf_counter() - start)

    for i in range(args.repeats):  # interleaved, so both see the same machine
        timed_save(work / "one" / f"step-{i + 1}", plain, "one tier (shared path)")
        timed_save(work / "two" / f"step-{i + 1}", tiers, "two tiers (local + partner + drain)")
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    local_root = work / "local" / f"n{rank}"
    for label in ("restore: every copy local", "restore: node 1 lost (partner)", "restore: shared path"):
        for _ in range(args.repeats):
            if label.endswith("(partner)") and rank == 1:
                shutil.rmtree(local_root, ignore_errors=True)
            if label.endswith("shared path"):
                shutil.rmtree(local_root, ignore_errors=True)
            dist.barrier()
            start = time.perf_counter()
            result = restore(target, work / "two", tiers)
            record(label, time.perf_counter() - start)
            assert result is not None and all(torch.equal(target[k], v) for k, v in state.items() if isinstance(v, torch.Tensor))
    medians = {name: statistics.median(values) for name, values in rows.items()}
    worst = [None] * dist.get_world_size()
    dist.all_gather_object(worst, medians)
    if rank == 0:
        print(f"\nmulti-level benchmark: {args.nodes} simulated nodes x 1 rank, {args.mib} MiB per rank, "
              f"median of {args.repeats}, slowest rank")
        print(f"{'':52s} {'seconds':>9s} {'GiB/s (job)':>12s}")
        total = args.mib * args.nodes / 1024
        for name in rows:
            seconds = max(m[name] for m in worst)
            print(f"{name:52s} {seconds:9.3f} {total / seconds if seconds else float('inf'):12.2f}")
            if os.environ.get("BENCH_RAW"):
                print("   raw", [round(x, 3) for x in rows[name]])
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
