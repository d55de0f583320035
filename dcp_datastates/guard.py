"""Waiting for lazy snapshots only where training would overwrite what they still read.

Parameters do not change during forward and backward: only the optimizer step (and
anything else that writes state in place) must wait until the snapshot's copies are
done. Every ``torch.optim`` step already waits while a snapshot of this process reads
live state (``capture``'s global step guard); ``install_optimizer_guard`` also makes an
optimizer known before its first step (so its parameters are read lazily, not captured),
and can tie the wait to one writer. ``wait_staged`` is for in-place writes outside an
optimizer step (EMA into parameters, manual SGD, ``p.data`` assignments).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from dcp_datastates.step_guard import note_optimizer
from dcp_datastates.snapshot import wait_all_staged


def wait_staged(writer: Any | None = None) -> float:
    """Block until pending snapshots (``writer``'s, or every one in this process) stop reading live state.

    Returns the seconds spent waiting: the training stall this checkpoint cost.
    """
    start = time.perf_counter()
    if writer is not None:
        writer.wait_staged()
    else:
        wait_all_staged()
    return time.perf_counter() - start


def install_optimizer_guard(optimizer: torch.optim.Optimizer, writer: Any | None = None) -> RemovableHandle:
    """Make ``optimizer.step()`` wait for the snapshot copies it would overwrite; returns the hook handle."""

    note_optimizer(optimizer)

    def before_step(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        wait_staged(writer)

    return optimizer.register_step_pre_hook(before_step)
