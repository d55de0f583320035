"""Train a small model, checkpoint asynchronously with DataStates every few steps, then resume.

    python examples/train_and_resume.py                      # checkpoints go to a fresh temporary directory
    python examples/train_and_resume.py --dir ./my_ckpts     # a new or empty directory of your choice

Phase 1 trains for --steps steps and calls ``dcp.async_save(..., storage_writer=DataStatesWriter(path))``
every --every steps; training continues while the checkpoint is written. Phase 2 builds a fresh
model and optimizer, loads the latest complete checkpoint with ``DataStatesReader``, and checks that
the restored state is exactly the one saved at that step and that its losses match the uninterrupted run.

The example never deletes anything: ``--dir`` must be new or empty (a directory holding other
files is refused), and the checkpoints it writes stay there for ``dcp-datastates inspect``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter, install_optimizer_guard
from dcp_datastates.resume import latest_complete_checkpoint

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class TrainState(Stateful):
    """Model, optimizer, LR scheduler and step counter as one DCP-stateful object."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=5, gamma=0.5)
        self.step = 0

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data depends only on the step, so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(32, 64, generator=g)
    return x, torch.sin(x)


def train_step(ts: TrainState) -> float:
    x, y = batch(ts.step)
    loss = torch.nn.functional.mse_loss(ts.model(x), y)
    ts.optimizer.zero_grad()
    loss.backward()
    ts.optimizer.step()
    ts.scheduler.step()
    ts.step += 1
    return loss.item()


def checkpoint_root(requested: Path | None) -> Path:
    """The directory this run saves into: a fresh one of its own, or the user's if new or empty.

    The example deletes nothing, so it cannot wipe a user's files; it refuses a directory that
    already holds anything (another run's checkpoints included: saving step-N would replace that
    run's step-N, and resuming could pick up a newer step left by that run).
    """
    if requested is None:
        return Path(tempfile.mkdtemp(prefix="dcp_datastates_example_"))
    if requested.exists() and not requested.is_dir():
        raise ValueError(f"--dir {str(requested)!r} is a file; pass a new or empty directory, or omit --dir")
    if requested.is_dir():
        held = sorted(p.name for p in requested.iterdir())
        if held:
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            raise ValueError(
                f"--dir {str(requested)!r} is not empty (it holds {shown}). The example never deletes files: "
                "pass a new or empty directory, or omit --dir to use a fresh temporary one."
            )
    requested.mkdir(parents=True, exist_ok=True)
    return requested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None,
                        help="new or empty directory for the checkpoints (default: a fresh temporary directory)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()
    try:
        args.dir = checkpoint_root(args.dir)
    except ValueError as exc:
        parser.error(str(exc))  # exit status 2, nothing touched
    print(f"checkpoints go to {args.dir}")
    config = DataStatesConfig(chunk_bytes="1MiB", host_pool_bytes="8MiB")

    # Phase 1: train, checkpointing asynchronously. The guard makes optimizer.step() wait for the
    # snapshot's copies (if they are still running); forward and backward never wait.
    ts, pending, snapshots, losses = TrainState(), None, {}, {}
    install_optimizer_guard(ts.optimizer)
    while ts.step < args.steps:
        step = ts.step
        losses[step] = train_step(ts)
        if ts.step % args.every == 0:
            if pending is not None:
                pending.upload_completion.result()  # at most one save in flight
            snapshots[ts.step] = copy.deepcopy(ts.model.state_dict())
            pending = dcp.async_save({"train": ts}, storage_writer=DataStatesWriter(args.dir / f"step-{ts.step}", config), no_dist=True)
            print(f"step {ts.step:3d}  loss {losses[step]:.5f}  checkpoint started (async)")
    pending.upload_completion.result()

    # Phase 2: a fresh process state resumes from the latest complete checkpoint.
    latest = latest_complete_checkpoint(args.dir)
    assert latest is not None, "no complete checkpoint found"
    resumed = TrainState(seed=99)  # different init: everything must come from the checkpoint
    dcp.load({"train": resumed}, storage_reader=DataStatesReader(latest), no_dist=True)
    for name, value in snapshots[resumed.step].items():
        assert torch.equal(resumed.model.state_dict()[name], value), f"{name} differs from the step-{resumed.step} snapshot"
    print(f"resumed from {latest} at step {resumed.step}: parameters match the saved snapshot exactly")

    # The uninterrupted run's loss curve, a few steps further; the resumed run must match it bit for bit.
    while ts.step < args.steps + 3:
        step = ts.step
        losses[step] = train_step(ts)
    for _ in range(3):
        expected, got = losses[resumed.step], train_step(resumed)
        assert got == expected, f"step {resumed.step}: resumed loss {got} != uninterrupted {expected}"
        print(f"step {resumed.step:3d}  loss {got:.5f}  (resumed, identical to the uninterrupted run)")
    print(f"OK (checkpoints kept in {args.dir}; try: dcp-datastates inspect {latest})")


if __name__ == "__main__":
    main()
