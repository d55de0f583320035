"""A small Llama-style model trained with FSDP2 under torchrun, checkpointing with DataStates.

    torchrun --nproc_per_node=2 examples/train_fsdp.py --dir /tmp/fsdp_run --steps 12 --every 3 --keep 2

Every --every steps the loop calls ``dcp.async_save(..., storage_writer=DataStatesWriter(...))``
and goes on training; the optimizer guard makes ``optimizer.step()`` wait only for the
snapshot's copies. After each commit, checkpoints beyond the latest --keep are deleted. On
start, the run resumes from the newest *complete* checkpoint under --dir, if any -- also with a
different number of ranks (the checkpoint is resharded on load). The data order depends only
on the step, and each rank's RNG state is saved, so a resumed run continues the loss curve of
an uninterrupted one exactly (same world size). Rank 0 prints one line per step (step, loss,
checkpoints started, committed and resumed from); the losses also go to <dir>/losses.jsonl, one
JSON object per line ({"step": 4, "loss": 4.01, "world": 2}).

--kill-at STEP simulates a crash in the middle of the save of that step: right after the
asynchronous save has started, rank 0 prints "simulated crash at step STEP" and every rank
exits at once with status 17 (``os._exit``: no cleanup, no commit, like a job killed by its
scheduler). Run the same command without --kill-at to resume from the newest complete
checkpoint; the half-written one is never taken for complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter, install_optimizer_guard
from dcp_datastates.resume import latest_complete_checkpoint, list_complete_checkpoints

warnings.filterwarnings("ignore")
VOCAB, DIM, LAYERS, HEADS, SEQ, BATCH = 64, 32, 2, 4, 16, 8


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(DIM), RMSNorm(DIM)
        self.qkv = torch.nn.Linear(DIM, 3 * DIM, bias=False)
        self.out = torch.nn.Linear(DIM, DIM, bias=False)
        self.gate = torch.nn.Linear(DIM, 2 * DIM, bias=False)
        self.up = torch.nn.Linear(DIM, 2 * DIM, bias=False)
        self.down = torch.nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, HEADS, DIM // HEADS).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + F.dropout(self.out(attn.transpose(1, 2).reshape(b, t, DIM)), p=0.1, training=self.training)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(DIM)
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    """Tokens depend only on (step, rank, world): a resumed run sees the same data order."""
    g = torch.Generator().manual_seed(1_000_003 * step + 7919 * rank + world)
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--kill-at", type=int, default=-1,
                        help="simulate a crash of every rank in the middle of the save of this step (exit status 17)")
    args = parser.parse_args()
    if args.every < 1 or args.keep < 1:
        parser.error(f"--every and --keep must be at least 1, got --every {args.every} --keep {args.keep}")
    if args.kill_at != -1 and (args.kill_at < 1 or args.kill_at % args.every):
        parser.error(f"--kill-at {args.kill_at} would never fire: it must be a step that saves, a multiple of --every {args.every}")

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    args.dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = TinyLlama()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    install_optimizer_guard(optimizer)
    # Saves run on a background thread; their collectives need a process group of their own,
    # or they would interleave with training's all-reduces on the default group.
    checkpoint_group = dist.new_group(backend="gloo")
    config = DataStatesConfig(chunk_bytes="1MiB", host_pool_bytes="8MiB")
    checkpoints = args.dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)  # the resume root must exist (an empty one: start fresh)

    def state(step: int) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": step,
                f"rng_rank{rank}": torch.get_rng_state()}

    def say(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    start = 0
    latest = latest_complete_checkpoint(checkpoints)
    if latest is not None:
        target = state(0)
        if f"rng_rank{rank}" not in _saved_keys(latest):
            del target[f"rng_rank{rank}"]  # resuming on more ranks than were saved
        dcp.load(target, storage_reader=DataStatesReader(latest))
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
        scheduler.load_state_dict(target["scheduler"])
        if f"rng_rank{rank}" in target:
            torch.set_rng_state(target[f"rng_rank{rank}"])
        start = target["step"]
        say(f"resumed from {latest} at step {start} on {world} {'rank' if world == 1 else 'ranks'}")
    else:
        say(f"no complete checkpoint under {checkpoints}: starting at step 0 on {world} {'rank' if world == 1 else 'ranks'}")
    say(f"losses are appended to {args.dir / 'losses.jsonl'}")

    pending, pending_step = None, 0
    for step in range(start, args.steps):
        tokens = batch(step, rank, world)
        loss = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # waits here, and only here, for a snapshot still copying
        scheduler.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            with open(args.dir / "losses.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": mean_loss.item() / world, "world": world}) + "\n")
        done = step + 1
        line = f"step {done:4d}/{args.steps}  loss {mean_loss.item() / world:.4f}"
        if done % args.every == 0:
            if pending is not None:
                pending.upload_completion.result()
                _keep_latest(checkpoints, args.keep, rank)
                say(f"           checkpoint step-{pending_step} committed")
            writer = DataStatesWriter(checkpoints / f"step-{done}", config)
            pending, pending_step = dcp.async_save(state(done), storage_writer=writer, process_group=checkpoint_group), done
            line += f"  checkpoint step-{done} started (async)"
            if done == args.kill_at:
                _simulated_crash(done, rank, line)
        say(line)
    if pending is not None:
        pending.upload_completion.result()
        _keep_latest(checkpoints, args.keep, rank)
        say(f"           checkpoint step-{pending_step} committed")
    dist.barrier()
    dist.destroy_process_group()
    say(f"done: {args.steps} steps; complete checkpoints: {[p.name for p in list_complete_checkpoints(checkpoints)]}")


def _simulated_crash(step: int, rank: int, line: str) -> None:
    """Every rank dies here, mid-save: no Python cleanup, no commit, no collective of the save left to fail."""
    if rank == 0:
        print(line, flush=True)
        print(f"simulated crash at step {step} (--kill-at {step}): every rank exits now with status 17, in the middle "
              f"of the step-{step} save; run the same command without --kill-at to resume", flush=True)
    # on the training group (the save runs on its own): rank 0 has said why before any rank dies --
    # else the launcher may kill rank 0 for another rank's exit before it prints
    dist.barrier()
    sys.stderr.flush()
    os._exit(17)


def _saved_keys(path: Path) -> set[str]:
    return {key.split(".")[0] for key in DataStatesReader(path).read_metadata().state_dict_metadata}


def _keep_latest(root: Path, keep: int, rank: int) -> None:
    dist.barrier()  # every rank's part of the newest checkpoint is committed
    if rank == 0:
        for old in list_complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)


if __name__ == "__main__":
    main()
