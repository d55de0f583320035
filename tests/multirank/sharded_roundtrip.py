"""Run under torchrun --nproc_per_node=2: DTensor saves and resharded loads through DataStates.

    sharded_roundtrip.py save-and-reshard OUT_DIR   # 3 saves (save, async THREAD, async PROCESS), resharded loads
    sharded_roundtrip.py load-sharded CKPT_DIR      # load a 1-process checkpoint into DTensors
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from dcp_datastates import DataStatesConfig, DataStatesLoadPlanner, DataStatesReader, DataStatesSavePlanner, DataStatesWriter
from expected import full_tensors, object_placeholders, objects

warnings.filterwarnings("ignore")


def shard_as(full: dict[str, torch.Tensor], layouts: dict) -> dict:
    return {k: distribute_tensor(full[k].clone(), mesh, placements) for k, (mesh, placements) in layouts.items()}


def check(loaded: dict, what: str) -> None:
    expected = full_tensors()
    for key, value in expected.items():
        got = loaded[key].full_tensor() if hasattr(loaded[key], "full_tensor") else loaded[key]
        assert got.dtype == value.dtype and torch.equal(got, value), f"{what}: {key} differs on rank {dist.get_rank()}"
    for key, value in objects().items():
        assert loaded[key] == value, f"{what}: {key} = {loaded[key]!r}"
    print(f"rank {dist.get_rank()}: {what} OK", flush=True)


def random_shardings(directory: str, *meshes) -> int:
    """Seeded (same on every rank) random states, saved with one random sharding, loaded with another."""
    import random

    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.float64, torch.int8, torch.bool]
    for case in range(20):
        rng = random.Random(case)

        def placements_for(mesh, ndim):
            options = [Replicate()] + [Shard(d) for d in range(ndim)]
            return [rng.choice(options) for _ in range(mesh.ndim)]

        full, save_layout, load_layout = {}, {}, {}
        for k in range(rng.randint(1, 4)):
            ndim = rng.randint(1, 3)
            shape = tuple(rng.randint(1, 9) for _ in range(ndim))
            dtype = rng.choice(dtypes)
            g = torch.Generator().manual_seed(case * 100 + k)
            full[f"t{k}"] = (torch.randn(shape, generator=g) * 50).to(dtype)
            save_mesh, load_mesh = rng.choice(meshes), rng.choice(meshes)
            save_layout[f"t{k}"] = (save_mesh, placements_for(save_mesh, ndim))
            load_layout[f"t{k}"] = (load_mesh, placements_for(load_mesh, ndim))
        path = os.path.join(directory, f"random{case}")
        config = DataStatesConfig(io_engine=rng.choice(["threads", "io_uring"]), chunk_bytes=4096, host_pool_bytes=3 * 4096)
        dcp.save(shard_as(full, save_layout) | {"case": case}, storage_writer=DataStatesWriter(path, config))
        target = shard_as({k: torch.zeros_like(v) for k, v in full.items()}, load_layout) | {"case": -1}
        dcp.load(target, storage_reader=DataStatesReader(path))
        assert target["case"] == case
        for key, value in full.items():
            got = target[key].full_tensor()
            assert got.dtype == value.dtype and torch.equal(got, value), (case, key, save_layout[key][1], load_layout[key][1])
    return 20


def main() -> None:
    mode, directory = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    mesh_1d = init_device_mesh("cpu", (2,))
    mesh_a = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    mesh_b = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    full = full_tensors()
    if mode == "save-and-reshard":
        save_layout = {
            "f32": (mesh_1d, [Shard(0)]), "bf16": (mesh_1d, [Shard(0)]), "i64": (mesh_1d, [Shard(0)]),
            "grid_a": (mesh_a, [Shard(0), Shard(1)]), "grid_b": (mesh_b, [Shard(0), Shard(1)]),
        }
        load_layout = {
            "f32": (mesh_1d, [Shard(1)]), "bf16": (mesh_1d, [Replicate()]), "i64": (mesh_1d, [Shard(1)]),
            "grid_a": (mesh_b, [Shard(1), Shard(0)]), "grid_b": (mesh_1d, [Shard(0)]),
        }
        state = shard_as(full, save_layout) | {"scalar": full["scalar"].clone()} | objects()
        small = DataStatesConfig(io_engine="threads", chunk_bytes=4096, host_pool_bytes=4 * 4096)
        dcp.save(state, storage_writer=DataStatesWriter(os.path.join(directory, "sync"), small), planner=DataStatesSavePlanner())
        dcp.async_save(state, storage_writer=DataStatesWriter(os.path.join(directory, "async_thread"))).upload_completion.result()
        dcp.async_save(
            state,
            storage_writer=DataStatesWriter(os.path.join(directory, "async_process"), DataStatesConfig(io_engine="io_uring")),
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
        ).upload_completion.result()
        for name in ("sync", "async_thread", "async_process"):
            target = shard_as({k: torch.zeros_like(v) for k, v in full.items()}, load_layout)
            target |= {"scalar": torch.zeros(())} | object_placeholders()
            dcp.load(target, storage_reader=DataStatesReader(os.path.join(directory, name)), planner=DataStatesLoadPlanner())
            check(target, f"{name} resharded 2->2")
    elif mode == "random-shardings":
        count = random_shardings(directory, mesh_1d, mesh_a, mesh_b)
        print(f"rank {dist.get_rank()}: random shardings OK ({count} states)", flush=True)
    elif mode == "load-sharded":
        layout = {k: (mesh_1d, [Shard(0)]) for k in ("f32", "bf16", "i64")} | {"grid_a": (mesh_a, [Shard(1), Shard(0)]), "grid_b": (mesh_b, [Replicate(), Shard(1)])}
        target = shard_as({k: torch.zeros_like(v) for k, v in full.items()}, layout) | {"scalar": torch.zeros(())} | object_placeholders()
        dcp.load(target, storage_reader=DataStatesReader(directory))
        check(target, "1->2")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
