"""torchtitan 0.3.0 config registry whose trainer checkpoints through DataStates.

torchtitan's ``ConfigManager`` resolves ``--module M --config F`` like this: a short name from
its own list (``llama3``, ``qwen3``, ...) means ``torchtitan.models.M.config_registry``; any other
``M`` is imported as ``M.config_registry`` and, failing that, as ``M`` itself. ``F`` is a function
of that module called with no arguments; it returns the ``Trainer.Config`` whose field *types*
tyro turns into command-line flags. So ``--checkpoint.storage_backend`` exists only when the
config's ``checkpoint`` is a ``DataStatesCheckpointManager.Config`` -- with the stock
``--module llama3`` it is torchtitan's own ``CheckpointManager.Config`` and the flag is
"Unrecognized". This module is such an ``M``: put this folder on ``PYTHONPATH`` and run

    torchrun --nproc_per_node=1 -m torchtitan.train \\
        --module torchtitan_datastates --config llama3_debugmodel_datastates \\
        --checkpoint.enable --checkpoint.interval 5

``with_datastates(config)`` does the same for any torchtitan ``Trainer.Config`` (write your own
registry function that calls it on your model's config).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torchtitan.models.llama3.config_registry import llama3_debugmodel
from torchtitan.trainer import Trainer

from dcp_datastates.integrations.torchtitan import DataStatesCheckpointManager

__all__ = ["with_datastates", "llama3_debugmodel_datastates"]


def with_datastates(config: Trainer.Config, **datastates_fields: Any) -> Trainer.Config:
    """Return ``config`` with its ``checkpoint`` replaced by a ``DataStatesCheckpointManager.Config``.

    Every setting of the existing checkpoint config (interval, folder, keep_latest_k, async_mode,
    ...) carries over; ``datastates_fields`` sets ours (``storage_backend``,
    ``datastates_host_pool_bytes``, ``datastates_chunk_bytes``, ``datastates_io_engine``) and is
    validated at once, so a bad size fails here rather than at the first save.
    """
    old = config.checkpoint
    carried = {f.name: getattr(old, f.name) for f in dataclasses.fields(old) if f.init}
    ours = {f.name for f in dataclasses.fields(DataStatesCheckpointManager.Config)}
    unknown = sorted(set(datastates_fields) - ours)
    if unknown:
        raise TypeError(f"with_datastates() got unknown checkpoint fields {unknown}; known: {sorted(ours)}")
    config.checkpoint = DataStatesCheckpointManager.Config(**{**carried, **datastates_fields})
    return config


def llama3_debugmodel_datastates() -> Trainer.Config:
    """torchtitan's ``llama3_debugmodel`` (``--module llama3 --config llama3_debugmodel``), saving through DataStates."""
    return with_datastates(llama3_debugmodel())
