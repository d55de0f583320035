"""Parse examples/torchtitan_datastates.py with torchtitan's own ConfigManager and build the manager
(run by tests/test_torchtitan_example.py; examples/ must be on PYTHONPATH).

    python parse_example_config.py FOLDER

Prints one JSON line per check. The built manager saves one step and a fresh one loads it back.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def parse(args: list[str]):
    """torchtitan's ConfigManager; a SystemExit (tyro's usage errors) is returned with its text."""
    from torchtitan.config import ConfigManager

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            return ConfigManager().parse_args(args), ""
    except SystemExit as exc:
        return None, f"exit {exc.code}: {err.getvalue()}"


def build(config, folder: str, seed: int):
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from tiny_training import tiny_model_and_optimizers

    model, optimizers = tiny_model_and_optimizers(seed)
    schedulers = LRSchedulersContainer(optimizers, lambda step: 1.0)
    manager = config.checkpoint.build(dataloader=None, model_parts=[model], optimizers=optimizers,
                                      lr_schedulers=schedulers, states={}, sd_adapter=None, base_folder=folder)
    return model, optimizers, manager


def main() -> None:
    folder = sys.argv[1]
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    from dcp_datastates.integrations.torchtitan import DataStatesCheckpointManager

    module = ["--module", "torchtitan_datastates", "--config", "llama3_debugmodel_datastates"]
    flags = ["--checkpoint.enable", "--checkpoint.interval", "5", "--checkpoint.async_mode", "async",
             "--checkpoint.storage_backend", "datastates",
             "--checkpoint.datastates_host_pool_bytes", "8MiB", "--checkpoint.datastates_chunk_bytes", "1MiB",
             "--checkpoint.datastates_io_engine", "threads"]
    config, err = parse(module + flags)
    assert config is not None, err
    stock = llama3_debugmodel()
    ckpt = config.checkpoint
    print(json.dumps({
        "check": "parsed",
        "checkpoint_type": type(ckpt).__qualname__,
        "is_ours": type(ckpt) is DataStatesCheckpointManager.Config,
        "enable": ckpt.enable, "interval": ckpt.interval, "async_mode": ckpt.async_mode, "storage_backend": ckpt.storage_backend,
        "pool": ckpt.datastates_host_pool_bytes, "chunk": ckpt.datastates_chunk_bytes, "engine": ckpt.datastates_io_engine,
        # carried over from llama3_debugmodel()'s own checkpoint config (it sets this to False)
        "last_save_model_only": ckpt.last_save_model_only, "stock_last_save_model_only": stock.checkpoint.last_save_model_only,
        # the rest of the trainer config is llama3_debugmodel's
        "same_training": config.training == stock.training, "same_model": config.model_spec.name == stock.model_spec.name,
    }), flush=True)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 400))
    dist.init_process_group("gloo", rank=0, world_size=1)
    model, optimizers, manager = build(config, folder, seed=0)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    model(x).square().mean().backward()
    optimizers.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = {k: v["exp_avg"].clone() for k, v in optimizers.optimizers[0].state_dict()["state"].items()}
    manager.save(curr_step=5)
    manager.maybe_wait_for_saving()  # async_mode=async: torchtitan's close() does not wait for the save
    manager.close()
    step_dir = os.path.join(folder, ckpt.folder, "step-5")
    model2, optimizers2, manager2 = build(config, folder, seed=1)
    loaded = manager2.load(step=-1)
    manager2.close()
    print(json.dumps({
        "check": "built",
        "manager_type": type(manager).__name__,
        "use_datastates": manager.use_datastates,
        "writer_config": manager.datastates_config.model_dump(mode="json"),
        "files": sorted(os.listdir(step_dir)),
        "loaded": loaded,
        "model_exact": all(torch.equal(model2.state_dict()[k], v) for k, v in saved.items()),
        "optimizer_exact": all(torch.equal(optimizers2.optimizers[0].state_dict()["state"][k]["exp_avg"], v)
                               for k, v in exp_avg.items()),
    }), flush=True)
    dist.destroy_process_group()

    from torchtitan_datastates import with_datastates

    errors = {}
    for name, fields in {"unknown": {"datastates_pool": "1GiB"}, "bad_value": {"datastates_chunk_bytes": "5000"}}.items():
        try:
            with_datastates(llama3_debugmodel(), **fields)
            errors[name] = "accepted"
        except (TypeError, ValueError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    kept = with_datastates(llama3_debugmodel(), storage_backend="filesystem", datastates_io_engine="threads").checkpoint
    errors["kept"] = [kept.interval, kept.last_save_model_only, kept.storage_backend, kept.datastates_io_engine]
    print(json.dumps({"check": "with_datastates", **errors}), flush=True)

    _, err = parse(module + ["--checkpoint.datastates_chunk_bytes", "5000"])
    print(json.dumps({"check": "bad_chunk", "error": err}), flush=True)
    _, err = parse(["--module", "llama3", "--config", "llama3_debugmodel", "--checkpoint.storage_backend", "datastates"])
    print(json.dumps({"check": "stock_module", "error": err}), flush=True)


if __name__ == "__main__":
    main()
