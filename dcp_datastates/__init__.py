"""dcp-datastates: DataStates-LLM lazy, asynchronous checkpointing for torch.distributed.checkpoint.

    import torch.distributed.checkpoint as dcp
    from dcp_datastates import DataStatesWriter, DataStatesReader

    dcp.async_save(state, storage_writer=DataStatesWriter(path))
    dcp.load(state, storage_reader=DataStatesReader(path))
"""

from importlib.metadata import PackageNotFoundError, version

try:  # one source of truth: the installed package's metadata (pyproject.toml's version)
    __version__ = version("dcp-datastates")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from dcp_datastates.config import DataStatesConfig  # noqa: E402
from dcp_datastates.errors import (
    CheckpointExistsError,
    CheckpointIOError,
    CheckpointPathError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    DataStatesError,
    IncompleteCheckpointError,
    InvalidOptionError,
    MissingKeysError,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    UnverifiedCheckpointError,
)
from dcp_datastates.guard import install_optimizer_guard, wait_staged
from dcp_datastates.planner import DataStatesLoadPlanner, DataStatesSavePlanner
from dcp_datastates.reader import DataStatesReader
from dcp_datastates.writer import DataStatesWriter
from dcp_datastates.tiers import MultiLevelConfig, TierConfigError  # noqa: E402
from dcp_datastates.tier_runtime import flush_tiers, shutdown_tiers  # noqa: E402
from dcp_datastates.tier_restore import find_restorable, restore  # noqa: E402

__all__ = [
    "__version__",
    "MultiLevelConfig",
    "TierConfigError",
    "find_restorable",
    "flush_tiers",
    "restore",
    "shutdown_tiers",
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
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "UnverifiedCheckpointError",
    "install_optimizer_guard",
    "wait_staged",
]
