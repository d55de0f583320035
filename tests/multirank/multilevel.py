"""Run under torchrun --nproc_per_node=2: two simulated nodes (n0, n1), one rank each, multi-level checkpoints.

    multilevel.py save-a ROOT        # steps 1-3 (local, partner, drain), restores, then step 4 whose drain dies on n1
    multilevel.py save-b ROOT        # step 1, then step 2 whose partner copy dies on n1 mid-copy
    multilevel.py restore ROOT_A ROOT_B   # after n1's local disk is gone: restores from partner copies, then shared

Every restore compares each value bit for bit and prints what each rank read from where.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

warnings.filterwarnings("ignore")
if "RANK" in os.environ:  # under torchrun (the test imports full() from here too)
    os.environ["DCP_DATASTATES_NODE"] = f"n{os.environ['RANK']}"  # one simulated node per rank

from dcp_datastates import DataStatesConfig, DataStatesWriter  # noqa: E402
from dcp_datastates import drain, partner  # noqa: E402
from dcp_datastates.tier_restore import restore  # noqa: E402
from dcp_datastates.tier_runtime import TierRuntime, flush_tiers  # noqa: E402
from dcp_datastates.tiers import MultiLevelConfig  # noqa: E402


def say(line: str) -> None:
    """One whole line in one write: the ranks share the launcher's stdout, and a line split in two interleaves."""
    os.write(1, (line + "\n").encode())


def config(root: str) -> DataStatesConfig:
    return DataStatesConfig(io_engine="threads", chunk_bytes=8192, host_pool_bytes=4 * 8192,
                            multilevel=MultiLevelConfig(local_dir=f"{root}/local/{{node}}", partners=1, keep_local=2))


def full(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"shard": torch.randn(64, 16, generator=g), "rep": torch.randn(300, generator=g).to(torch.bfloat16), "step": step}


def state(step: int, mesh) -> dict:
    values = full(step)
    return {"shard": distribute_tensor(values["shard"], mesh, [Shard(0)]), "rep": values["rep"].clone(), "step": step}


def blank(mesh) -> dict:
    return {"shard": distribute_tensor(torch.zeros(64, 16), mesh, [Shard(0)]), "rep": torch.zeros(300, dtype=torch.bfloat16), "step": -1}


def check(loaded: dict, step: int) -> None:
    want = full(step)
    assert loaded["step"] == step, (loaded["step"], step)
    got = loaded["shard"].full_tensor() if isinstance(loaded["shard"], DTensor) else loaded["shard"]
    assert torch.equal(got, want["shard"]), "shard differs"
    assert loaded["rep"].dtype == torch.bfloat16 and torch.equal(loaded["rep"], want["rep"]), "rep differs"


def save(root: str, step: int, mesh, group) -> None:
    writer = DataStatesWriter(f"{root}/shared/step-{step}", config(root))
    dcp.async_save(state(step, mesh), storage_writer=writer, process_group=group).upload_completion.result()


def do_restore(root: str, mesh, what: str) -> None:
    target = blank(mesh)
    result = restore(target, f"{root}/shared", config(root))
    assert result is not None, what
    check(target, result.step)
    say(f"rank {dist.get_rank()}: {what}: step {result.step} OK local={result.bytes_local} "
          f"fetched={result.bytes_fetched} shared={result.bytes_shared}")


def die(*_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    mode = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    group = dist.new_group(backend="gloo")  # saves' own group, as torchtitan makes one
    if mode == "save-a":
        root = sys.argv[2]
        for step in (1, 2, 3):
            save(root, step, mesh, group)
        assert flush_tiers(120)
        outcomes = [(o.name, o.local_committed, o.partner_committed, o.drain.result()) for o in TierRuntime.current().outcomes]
        say(f"rank {rank}: outcomes {outcomes}")
        # a plain single-tier save of step 3, to compare records with
        dcp.save(state(3, mesh), storage_writer=DataStatesWriter(f"{root}/plain-step-3", DataStatesConfig(
            io_engine="threads", chunk_bytes=8192, host_pool_bytes=4 * 8192)))
        do_restore(root, mesh, "all local")
        dist.barrier()
        if rank == 1:  # tear one of n1's own files: it comes from n0's partner copy
            victim = sorted(Path(f"{root}/local/n1/step-3").glob("__1_*_0.distcp"))[0]
            os.truncate(victim, victim.stat().st_size // 2)
        dist.barrier()
        do_restore(root, mesh, "n1 file torn")
        dist.barrier()
        if rank == 1:
            drain.copy_one = lambda source, target, fsync: (shutil.copyfile(source, target.with_name(target.name + ".part")),
                                                             open(target.with_name(target.name + ".part"), "r+b").truncate(100), die())
        save(root, 4, mesh, group)
        say(f"rank {rank}: step 4 saved")
        flush_tiers(120)
        say(f"rank {rank}: the drain of step 4 was not killed")
    elif mode == "save-b":
        root = sys.argv[2]
        save(root, 1, mesh, group)
        assert flush_tiers(120)
        partner.CHUNK_BYTES = 4096
        if rank == 1:
            calls = {"n": 0}
            real = partner.write_piece

            def write_then_die(fd, data, offset):
                real(fd, data, offset)
                calls["n"] += 1
                if calls["n"] == 2:
                    die()

            partner.write_piece = write_then_die
        save(root, 2, mesh, group)
        say(f"rank {rank}: step 2 saved")
        flush_tiers(120)
        say(f"rank {rank}: the partner copy of step 2 was not killed")
    elif mode == "restore":
        root_a, root_b = sys.argv[2], sys.argv[3]
        do_restore(root_a, mesh, "A after n1 lost")
        dist.barrier()
        if rank == 0:  # now n0's own copy of step 4 is torn too: no whole copy of step 4 is left
            victim = sorted(Path(f"{root_a}/local/n0/step-4").glob("__0_*_0.distcp"))[0]
            os.truncate(victim, 10)
        dist.barrier()
        do_restore(root_a, mesh, "A step 4 torn")
        dist.barrier()
        shutil.rmtree(f"{root_a}/local/n{rank}", ignore_errors=True)
        dist.barrier()
        do_restore(root_a, mesh, "A no local")
        do_restore(root_b, mesh, "B after partner died")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
