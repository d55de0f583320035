"""Run under torchrun --nproc_per_node=2: replicated state read once per job, or by every rank.

    replicated_load.py load CKPT_DIR      # loads the full state on both ranks with each policy, prints bytes read
    replicated_load.py corrupt CKPT_DIR   # a damaged record owned by one rank: both ranks fail, neither hangs
    replicated_load.py refuse CKPT_DIR    # rank 1 (trusting) sends an object rank 0 refuses: both fail, no hang
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from dcp_datastates import DataStatesReader

warnings.filterwarnings("ignore")


def expected() -> dict:
    g = torch.Generator().manual_seed(21)
    state = {f"rep{i}": torch.randn(256 * 1024, generator=g) for i in range(6)}
    state["sharded"] = torch.randn(256, 64, generator=g)
    state["small"] = torch.arange(10, dtype=torch.int64)
    state["step"] = 9
    return state


def target(mesh) -> dict:
    out = {k: torch.zeros_like(v) for k, v in expected().items() if isinstance(v, torch.Tensor)}
    out["sharded"] = distribute_tensor(torch.zeros(256, 64), mesh, [Shard(0)])
    out["step"] = None
    return out


def main() -> None:
    mode, directory = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    if mode == "load":
        for policy in ("once", "every_rank", "auto"):
            state = target(mesh)
            reader = DataStatesReader(directory, replicated_reads=policy)
            dcp.load(state, storage_reader=reader)
            for key, value in expected().items():
                got = state[key].full_tensor() if key == "sharded" else state[key]
                if isinstance(value, torch.Tensor):
                    assert got.dtype == value.dtype and torch.equal(got, value), (policy, key, rank)
                else:
                    assert got == value, (policy, key, rank)
            stats = reader.last_read
            print(f"rank {rank}: {policy} OK bytes_read={stats.bytes_read} bytes_received={stats.bytes_received}", flush=True)
    elif mode in ("corrupt", "refuse"):
        state = target(mesh) | ({"frac": None} if mode == "refuse" else {})
        try:
            dcp.load(state, storage_reader=DataStatesReader(directory, replicated_reads="once", trust_checkpoint=rank == 1))
        except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            result = f"rank {rank}: failed: {' '.join(str(exc).split())}"
        else:
            result = f"rank {rank}: loaded a checkpoint it should have refused"
        with open(f"{directory}.rank{rank}.txt", "w") as f:  # long lines of two ranks would interleave on stdout
            f.write(result)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
