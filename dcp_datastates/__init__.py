"""dcp-datastates: DataStates-LLM lazy, asynchronous checkpointing for torch.distributed.checkpoint.

    import torch.distributed.checkpoint as dcp
    from dcp_datastates import DataStatesWriter, DataStatesReader

    dcp.async_save(state, storage_writer=DataStatesWriter(path))
    dcp.load(state, storage_reader=DataStatesReader(path))

Importing the package is cheap: each public name loads its module on first use (PEP 562),
so ``dcp-datastates --version`` and programs that only catch our errors do not pay for
torch, numba and the write path. Where torch is imported already, the global optimizer
step guard (``step_guard``) is registered now, so that optimizers stepping before the
first save are known to it.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:  # one source of truth: the installed package's metadata (pyproject.toml's version)
    __version__ = version("dcp-datastates")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from dcp_datastates.errors import (  # noqa: E402 - no torch: catching our errors costs nothing
    CheckpointBusyError,
    CheckpointDirectoryChangedError,
    CheckpointExistsError,
    CheckpointIOError,
    CheckpointPathError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    DataStatesError,
    IncompleteCheckpointError,
    InvalidOptionError,
    MissingKeysError,
    SaveAbandonedError,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    UnverifiedCheckpointError,
    unwrap,
    unwrap_errors,
)

#: public name -> the module that defines it, imported on first access
_LAZY = {
    "DataStatesConfig": "dcp_datastates.config",
    "DataStatesLoadPlanner": "dcp_datastates.planner",
    "DataStatesSavePlanner": "dcp_datastates.planner",
    "DataStatesReader": "dcp_datastates.reader",
    "DataStatesWriter": "dcp_datastates.writer",
    "MultiLevelConfig": "dcp_datastates.tiers",
    "TierConfigError": "dcp_datastates.tiers",
    "find_restorable": "dcp_datastates.tier_restore",
    "flush_tiers": "dcp_datastates.tier_runtime",
    "restore": "dcp_datastates.tier_restore",
    "shutdown_tiers": "dcp_datastates.tier_runtime",
    "abandon_in_flight_saves": "dcp_datastates.shutdown",
    "install_optimizer_guard": "dcp_datastates.guard",
    "latest_complete_checkpoint": "dcp_datastates.resume",
    "wait_staged": "dcp_datastates.guard",
}

if TYPE_CHECKING:
    from dcp_datastates.config import DataStatesConfig
    from dcp_datastates.guard import install_optimizer_guard, wait_staged
    from dcp_datastates.planner import DataStatesLoadPlanner, DataStatesSavePlanner
    from dcp_datastates.reader import DataStatesReader
    from dcp_datastates.resume import latest_complete_checkpoint
    from dcp_datastates.shutdown import abandon_in_flight_saves
    from dcp_datastates.tier_restore import find_restorable, restore
    from dcp_datastates.tier_runtime import flush_tiers, shutdown_tiers
    from dcp_datastates.tiers import MultiLevelConfig, TierConfigError
    from dcp_datastates.writer import DataStatesWriter


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dcp_datastates' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    """The public names (loaded or not), dunders and the submodules imported so far."""
    loaded = {name for name, value in globals().items() if getattr(value, "__name__", "").startswith("dcp_datastates.")}
    return sorted(set(__all__) | loaded | {name for name in globals() if name.startswith("__")})


if "torch" in sys.modules:  # a training program: know every optimizer that steps from now on
    from dcp_datastates import step_guard as _step_guard  # noqa: F401, E402

__all__ = [
    "__version__",
    "CheckpointBusyError",
    "CheckpointDirectoryChangedError",
    "CheckpointExistsError",
    "CheckpointIOError",
    "CheckpointPathError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "DataStatesConfig",
    "DataStatesError",
    "DataStatesLoadPlanner",
    "DataStatesReader",
    "DataStatesSavePlanner",
    "DataStatesWriter",
    "IncompleteCheckpointError",
    "InvalidOptionError",
    "MissingKeysError",
    "MultiLevelConfig",
    "SaveAbandonedError",
    "TierConfigError",
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "UnverifiedCheckpointError",
    "abandon_in_flight_saves",
    "find_restorable",
    "flush_tiers",
    "install_optimizer_guard",
    "latest_complete_checkpoint",
    "restore",
    "shutdown_tiers",
    "unwrap",
    "unwrap_errors",
    "wait_staged",
]
