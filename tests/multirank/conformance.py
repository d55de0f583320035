"""Multi-rank conformance scenarios for stock storage and ours; run by ``tests/test_conformance.py``.

    conformance.py two ROOT    # torchrun --nproc_per_node=2: saves of each side, 2->2 resharded loads, no_dist
    conformance.py four ROOT   # torchrun --nproc_per_node=4: 2->4 loads (both readers), 4-rank saves, process_group

Each rank prints one "rank R: ... OK" line per scenario it checked; the test asserts them.
The 4-rank saves are loaded 4->1 by the test itself, in one process.
"""

from __future__ import annotations

import io
import time
T0 = time.time()
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from conformance_state import SIDES, assert_same, finished, full_tensors, losses_blob, quantized, quantized_targets, reader, writer

warnings.filterwarnings("ignore")

MODES = ("sync", "async_thread", "async_process")


def sharded(values: dict[str, torch.Tensor], layout: dict) -> dict:
    return {k: distribute_tensor(values[k].clone(), mesh, placements) for k, (mesh, placements) in layout.items()}


def zeros(layout: dict) -> dict:
    return sharded({k: torch.zeros_like(v) for k, v in full_tensors().items()}, layout)


def expected(step: int, losses: list[float], side: str = "ours", mode: str = "sync") -> dict:
    return full_tensors() | extras(side, mode) | {"blob": losses_blob(losses), "step": step}


def extras(side: str, mode: str) -> dict:
    """Quantized tensors (replicated, plain): in every save of ours, in stock's synchronous ones only --
    stock's async staging cannot copy them (``test_conformance`` asserts that)."""
    return quantized() if mode == "sync" or side == "ours" else {}


def blank(side: str = "ours", mode: str = "sync") -> dict:
    return (quantized_targets() if extras(side, mode) else {}) | {"blob": None, "step": -1}


def ok(what: str) -> None:
    print(f"rank {dist.get_rank()}: {what} OK t={time.time() - T0:.1f}", flush=True)


def two(root: str) -> None:
    mesh = init_device_mesh("cpu", (2,))
    save_layout = {"w": (mesh, [Shard(0)]), "b": (mesh, [Replicate()]), "i": (mesh, [Shard(1)])}
    load_layout = {"w": (mesh, [Shard(1)]), "b": (mesh, [Shard(0)]), "i": (mesh, [Replicate()])}
    for side in SIDES:
        for mode in MODES:
            path = os.path.join(root, side, mode)
            # DTensors, replicated plain quantized tensors, a BytesIO and a step on every rank
            state = sharded(full_tensors(), save_layout) | extras(side, mode) | {"blob": losses_blob([1.0, 0.5]), "step": 2}
            if mode == "sync":
                dcp.save(state, storage_writer=writer(side, path))
            else:
                kind = AsyncCheckpointerType.PROCESS if mode == "async_process" else AsyncCheckpointerType.THREAD
                finished(dcp.async_save(state, storage_writer=writer(side, path), async_checkpointer_type=kind))
            target = zeros(load_layout) | blank(side, mode)
            dcp.load(target, storage_reader=reader(side, path))
            assert_same(target, expected(2, [1.0, 0.5], side, mode), f"{side} {mode}")
            ok(f"{side} {mode} 2->2")
        # no_dist: one rank saves on its own; every rank loads on its own
        path = os.path.join(root, side, "no_dist")
        if dist.get_rank() == 0:
            dcp.save({"t": torch.arange(5.0), "blob": io.BytesIO(b"solo")}, storage_writer=writer(side, path), no_dist=True)
        dist.barrier()
        for read_by in SIDES:
            target = {"t": torch.zeros(5), "blob": None}
            dcp.load(target, storage_reader=reader(read_by, path), no_dist=True)
            assert_same(target, {"t": torch.arange(5.0), "blob": io.BytesIO(b"solo")}, f"{side} no_dist read by {read_by}")
        ok(f"{side} no_dist")


def four(root: str) -> None:
    grid = init_device_mesh("cpu", (2, 2))
    line = init_device_mesh("cpu", (4,))
    load_layout = {"w": (grid, [Shard(0), Shard(1)]), "b": (line, [Shard(0)]), "i": (grid, [Replicate(), Shard(0)])}
    for side in SIDES:  # 2 -> 4, every 2-rank checkpoint read by both readers
        for mode in MODES:
            for read_by in SIDES:
                target = zeros(load_layout) | blank(side, mode)
                dcp.load(target, storage_reader=reader(read_by, os.path.join(root, side, mode)))
                assert_same(target, expected(2, [1.0, 0.5], side, mode), f"{side}/{mode} read by {read_by}")
                ok(f"{side}/{mode} read by {read_by} 2->4")
    save_layout = {"w": (grid, [Shard(1), Shard(0)]), "b": (grid, [Shard(0), Replicate()]), "i": (line, [Shard(0)])}
    for side in SIDES:  # 4-rank saves, loaded 4 -> 1 by the test
        state = sharded(full_tensors(), save_layout) | quantized() | {"blob": losses_blob([4.0, 2.0]), "step": 4}
        dcp.save(state, storage_writer=writer(side, os.path.join(root, side, "four")))
    # process_group: two groups of two ranks save (sync, then async) and load their own checkpoints
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = dist.get_rank() // 2
    group = groups[mine]
    for side in SIDES:
        for mode in ("sync", "async_thread"):
            path = os.path.join(root, side, f"group{mine}-{mode}")
            state = {"x": torch.full((6,), float(mine)), "blob": io.BytesIO(bytes([mine]) * 4), "group": mine}
            if mode == "sync":
                dcp.save(state, storage_writer=writer(side, path), process_group=group)
            else:
                finished(dcp.async_save(state, storage_writer=writer(side, path), process_group=group))
            for read_by in SIDES:
                target = {"x": torch.zeros(6), "blob": None, "group": -1}
                dcp.load(target, storage_reader=reader(read_by, path), process_group=group)
                assert_same(target, {"x": torch.full((6,), float(mine)), "blob": io.BytesIO(bytes([mine]) * 4), "group": mine})
        ok(f"{side} process_group")


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    {"two": two, "four": four}[mode](root)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
