"""Drive torchtitan's checkpoint manager with storage_backend=datastates (run by tests/test_torchtitan.py).

    python drive_checkpoint_manager.py FOLDER ASYNC_MODE [multilevel]   # multilevel: then again, multi-level

Trains a small model for 6 steps through torchtitan's OptimizersContainer/LRSchedulersContainer,
calling manager.save(step) every 2 steps (keep_latest_k=2) and torchtitan's own
maybe_wait_for_staging() before each optimizer step, then builds a fresh manager, loads the
latest checkpoint through DataStatesReader, and checks parameters, optimizer state and the
loss of the next step against the uninterrupted run. With ``multilevel`` the manager saves to a
node-local tier first (``datastates_local_dir``) and drains to its folder; the shared copy of
the last step is then deleted, so the load must come from the local tier.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def build(folder: str, async_mode: str, seed: int, multilevel: bool = False):
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from tiny_training import tiny_model_and_optimizers

    from dcp_datastates.integrations.torchtitan import DataStatesCheckpointManager

    model, optimizers = tiny_model_and_optimizers(seed)
    schedulers = LRSchedulersContainer(optimizers, lambda step: 1.0 / (1 + step))
    config = DataStatesCheckpointManager.Config(
        enable=True, folder="ckpt", interval=2, keep_latest_k=2, async_mode=async_mode,
        storage_backend="datastates", datastates_host_pool_bytes="8MiB", datastates_chunk_bytes="1MiB", last_save_model_only=False,
        datastates_local_dir=f"{folder}/local/{{node}}" if multilevel else "",
    )
    manager = config.build(dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
                           states={}, sd_adapter=None, base_folder=folder)
    assert type(manager).__name__ == "DataStatesCheckpointManager"
    return model, optimizers, schedulers, manager


def step(model, optimizers, schedulers, manager, i: int) -> float:
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizers.zero_grad()
    loss.backward()
    manager.maybe_wait_for_staging()  # torchtitan's trainer does this right before the step
    optimizers.step()
    schedulers.step()
    return loss.item()


def main() -> None:
    folder, async_mode = sys.argv[1], sys.argv[2]
    os.environ["DCP_DATASTATES_NODE"] = "solo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))
    dist.init_process_group("gloo", rank=0, world_size=1)
    run(folder, async_mode, multilevel=False)
    if sys.argv[3:] == ["multilevel"]:  # one process serves both (the suite's time budget)
        run(os.path.join(folder, "multilevel"), async_mode, multilevel=True)
    dist.destroy_process_group()


def run(folder: str, async_mode: str, multilevel: bool) -> None:
    model, optimizers, schedulers, manager = build(folder, async_mode, seed=0, multilevel=multilevel)
    snapshots, optim_snapshots, losses = {}, {}, {}
    for i in range(1, 7):
        losses[i] = step(model, optimizers, schedulers, manager, i)
        if i % 2 == 0:
            snapshots[i] = copy.deepcopy(model.state_dict())
            optim_snapshots[i] = copy.deepcopy(optimizers.optimizers[0].state_dict())
        manager.save(curr_step=i)
    manager.maybe_wait_for_saving() if hasattr(manager, "maybe_wait_for_saving") else None
    expected_next = step(model, optimizers, schedulers, manager, 7)
    manager.close()
    if multilevel:
        from dcp_datastates import flush_tiers

        assert flush_tiers(120)
        kept = sorted(p for p in os.listdir(os.path.join(folder, "local", "solo")) if p.startswith("step-"))
        print("local kept", kept)
        assert kept == ["step-4", "step-6"], kept  # datastates_keep_local=2
        assert os.path.isfile(os.path.join(folder, "ckpt", "step-6", ".metadata"))  # drained
        import shutil

        shutil.rmtree(os.path.join(folder, "ckpt", "step-6"))  # the load must come from the local tier
    else:
        kept = sorted(os.listdir(os.path.join(folder, "ckpt")))
        print("kept", kept)
        assert kept == ["step-4", "step-6"], kept  # keep_latest_k=2
    metadata_files = [f for f in os.listdir(os.path.join(folder, "local/solo" if multilevel else "ckpt", "step-6"))
                      if f.endswith("checksums.json")]
    assert metadata_files, "not written by DataStatesWriter"

    model2, optimizers2, schedulers2, manager2 = build(folder, async_mode, seed=123, multilevel=multilevel)
    assert manager2.load(step=-1)
    for name, value in snapshots[6].items():
        assert torch.equal(model2.state_dict()[name], value), name
    saved_optim, got_optim = optim_snapshots[6], optimizers2.optimizers[0].state_dict()
    assert saved_optim["state"] and sorted(got_optim["state"]) == sorted(saved_optim["state"]), got_optim["state"].keys()
    for pid, entry in saved_optim["state"].items():
        for name, value in entry.items():
            assert torch.equal(got_optim["state"][pid][name], value), (pid, name)
    assert got_optim["param_groups"] == saved_optim["param_groups"]
    resumed_next = step(model2, optimizers2, schedulers2, manager2, 7)
    assert resumed_next == expected_next, (resumed_next, expected_next)
    manager2.close()
    print(f"torchtitan {async_mode}{' multilevel' if multilevel else ''} OK: resumed at step 6, next loss "
          f"{resumed_next:.6f} matches")


if __name__ == "__main__":
    main()
