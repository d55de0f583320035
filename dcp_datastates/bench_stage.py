"""How long ``dcp.async_save`` keeps the training thread (issue 16.9): ours vs stock ``DefaultStager``.

    python -m dcp_datastates.bench_stage --tensors 20000 --side 64 --repeats 3

Times the call alone (what the training loop pays before it can go on), median of
``--repeats``, for many small CPU tensors owned by an SGD optimizer: once with the
optimizer known to dcp_datastates (it has stepped: its parameters are read lazily) and once
with a fresh optimizer that never stepped (every tensor is captured before the call
returns). Each save's upload is awaited outside the timed region.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from dcp_datastates import DataStatesConfig, DataStatesWriter


def _state(tensors: int, side: int, stepped: bool) -> tuple[dict, torch.optim.Optimizer]:
    params = [torch.nn.Parameter(torch.randn(side, side)) for _ in range(tensors)]
    optimizer = torch.optim.SGD(params, lr=0.1)
    if stepped:
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    return {"model": {f"layer{i}.weight": p.detach() for i, p in enumerate(params)}, "step": 1}, optimizer


def time_call(save) -> float:
    """Seconds until ``save()`` returns (what the caller pays); then waits for the save to finish."""
    start = time.perf_counter()
    response = save()
    elapsed = time.perf_counter() - start
    getattr(response, "upload_completion", response).result()
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=20_000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    config = DataStatesConfig(host_pool_bytes="512MiB")
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        rows = []
        for stepped in (True, False):
            state, optimizer = _state(args.tensors, args.side, stepped)
            for name, make in (
                ("DataStatesWriter", lambda s, p: (lambda: dcp.async_save(s, storage_writer=DataStatesWriter(p, config)))),
                ("stock DefaultStager", lambda s, p: (lambda: dcp.async_save(s, checkpoint_id=p))),
            ):
                times = []
                for r in range(args.repeats + 1):  # the first run is a warm-up (pool allocation, imports)
                    t = time_call(make(state, Path(root) / f"{name[:5]}-{stepped}-{r}"))
                    if r:
                        times.append(t)
                rows.append((name, "known (stepped)" if stepped else "none known", statistics.median(times), min(times), max(times)))
            del state, optimizer
    print(f"async_save call time, {args.tensors} CPU tensors of {args.side}x{args.side} fp32, median of {args.repeats}")
    print("| method | optimizer | ms (median) | range |")
    print("|---|---|---|---|")
    for name, opt, med, lo, hi in rows:
        print(f"| {name} | {opt} | {med * 1e3:.0f} | {lo * 1e3:.0f}-{hi * 1e3:.0f} |")


if __name__ == "__main__":
    main()
