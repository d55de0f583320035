"""Run under torchrun --nproc_per_node=2: replicated state is written once, by every save path.

    replicated_save.py OUT_DIR

Saves one state -- DDP-style plain tensors present on both ranks, DTensors replicated on a
1-D mesh and on one dimension of 2-D (HSDP-like) meshes, a sharded DTensor, Python objects
-- with stock ``dcp.save`` and with DataStatesWriter through ``dcp.save`` and
``dcp.async_save`` (THREAD and PROCESS executors); loads each back on both ranks and
checks every value; prints the bytes of data files each save left on disk (rank 0).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter

warnings.filterwarnings("ignore")

MIB_FLOATS = 256 * 1024  # 1 MiB of float32


def full_state() -> dict:
    """The same on every rank (seeded): what a 1-process load must see."""
    g = torch.Generator().manual_seed(16)
    state = {f"ddp.w{i}": torch.randn(MIB_FLOATS, generator=g) for i in range(4)}
    state |= {
        "ddp.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "rep1d": torch.randn(512, 512, generator=g),
        "hsdp_a": torch.randn(256, 1024, generator=g),
        "hsdp_b": torch.randn(256, 1024, generator=g),
        "shard": torch.randn(64, 1024, generator=g),
        "step": 77,
        "run": {"name": "ddp-run", "tags": ["x", "y"]},
    }
    return state


def layouts(mesh_1d, mesh_a, mesh_b) -> dict:
    return {
        "rep1d": (mesh_1d, [Replicate()]),
        "hsdp_a": (mesh_a, [Replicate(), Shard(0)]),  # replicated across the two ranks, HSDP style
        "hsdp_b": (mesh_b, [Replicate(), Shard(0)]),  # replicate dim of size 1: sharded across ranks
        "shard": (mesh_1d, [Shard(0)]),
    }


def distributed(state: dict, layout: dict) -> dict:
    return {k: distribute_tensor(v.clone(), *layout[k]) if k in layout else v for k, v in state.items()}


def blank(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            out[k] = distribute_tensor(torch.zeros(v.shape, dtype=v.dtype), v.device_mesh, v.placements)
        elif isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = None if not isinstance(v, dict) else {kk: None for kk in v}
    return out


def check(loaded: dict, what: str) -> None:
    for key, value in full_state().items():
        got = loaded[key]
        if isinstance(got, DTensor):
            got = got.full_tensor()
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and torch.equal(got, value), f"{what}: {key} differs on rank {dist.get_rank()}"
        else:
            assert got == value, f"{what}: {key} = {got!r}"


def data_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(".distcp"))


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    mesh_1d = init_device_mesh("cpu", (2,))
    mesh_a = init_device_mesh("cpu", (2, 1), mesh_dim_names=("rep", "shard"))
    mesh_b = init_device_mesh("cpu", (1, 2), mesh_dim_names=("rep", "shard"))
    layout = layouts(mesh_1d, mesh_a, mesh_b)
    state = distributed(full_state(), layout)
    config = DataStatesConfig(io_engine="threads", chunk_bytes=64 * 1024, host_pool_bytes=4 * 64 * 1024)
    paths = {name: os.path.join(out, name) for name in ("stock", "sync", "async_thread", "async_process")}

    dcp.save(state, storage_writer=dcp.FileSystemWriter(paths["stock"]))
    dcp.save(state, storage_writer=DataStatesWriter(paths["sync"], config))
    dcp.async_save(state, storage_writer=DataStatesWriter(paths["async_thread"], config)).upload_completion.result()
    dcp.async_save(
        state,
        storage_writer=DataStatesWriter(paths["async_process"], config),
        async_checkpointer_type=AsyncCheckpointerType.PROCESS,
    ).upload_completion.result()
    dist.barrier()

    for name, path in paths.items():
        target = blank(state)
        dcp.load(target, storage_reader=DataStatesReader(path) if name != "stock" else dcp.FileSystemReader(path))
        check(target, f"{name} 2->2")
    if dist.get_rank() == 0:
        print("BYTES " + json.dumps({name: data_bytes(path) for name, path in paths.items()}), flush=True)
    print(f"rank {dist.get_rank()}: replicated OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
