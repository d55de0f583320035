"""The global optimizer step guard: every ``torch.optim`` step waits while a snapshot reads live state.

One optimizer pre-step hook, registered when this module is first imported and never
removed. Installing it when a save starts and removing it when the last one finishes
would remove an entry of ``torch.optim``'s global hook dict from the snapshot thread
while the training thread iterates over that dict inside ``optimizer.step()`` --
exactly when the hook is waiting -- and make ``step()`` raise "OrderedDict mutated
during iteration". Outside a save the hook costs a weak-set insert and one truth test
per step.

It also notes every optimizer it sees stepping: their parameters and state are "known"
and a lazy snapshot may read them after ``async_save`` returns (see ``capture``). The
module needs only ``torch.optim``, which ``import torch`` has loaded already, so
``import dcp_datastates`` registers it at no cost in a program that imported torch
first (the package's other modules load on first use).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_known_optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_known_lock = threading.Lock()

#: Set by ``snapshot`` at import: blocks until no snapshot of this process reads live state.
wait_for_snapshots: Callable[[], None] | None = None
#: Set by ``snapshot``: whether a snapshot of this process still reads live state.
snapshots_reading: Callable[[], bool] = lambda: False
#: Set by ``signals``: runs on the stepping thread once no save is in flight (restores signal handlers).
after_saves: Callable[[], None] | None = None


def note_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Treat ``optimizer``'s parameters and state as guarded (their writes wait for snapshots)."""
    with _known_lock:
        _known_optimizers.add(optimizer)


def known_optimizers() -> list[torch.optim.Optimizer]:
    with _known_lock:
        return list(_known_optimizers)


def _step_guard(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Global pre-step hook: note the optimizer; while a snapshot reads live state, wait for it."""
    if optimizer not in _known_optimizers:
        note_optimizer(optimizer)
    if snapshots_reading() and wait_for_snapshots is not None:
        wait_for_snapshots()
    if after_saves is not None:
        after_saves()


_step_guard_handle = register_optimizer_step_pre_hook(_step_guard)
