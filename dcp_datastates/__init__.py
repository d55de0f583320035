"""dcp-datastates: DataStates-LLM lazy, asynchronous checkpointing for torch.distributed.checkpoint.

    import torch.distributed.checkpoint as dcp
    from dcp_datastates import DataStatesWriter, DataStatesReader

    dcp.async_save(state, storage_writer=DataStatesWriter(path))
    dcp.load(state, storage_reader=DataStatesReader(path))
"""

from dcp_datastates.config import DataStatesConfig
from dcp_datastates.errors import (
    CheckpointExistsError,
    CheckpointIOError,
    CheckpointPathError,
    ChecksumMismatchError,
    DataStatesError,
    IncompleteCheckpointError,
    MissingKeysError,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
)
from dcp_datastates.guard import install_optimizer_guard, wait_staged
from dcp_datastates.planner import DataStatesLoadPlanner, DataStatesSavePlanner
from dcp_datastates.reader import DataStatesReader
from dcp_datastates.writer import DataStatesWriter

__all__ = [
    "CheckpointExistsError",
    "CheckpointIOError",
    "CheckpointPathError",
    "ChecksumMismatchError",
    "DataStatesConfig",
    "DataStatesError",
    "DataStatesLoadPlanner",
    "DataStatesReader",
    "DataStatesSavePlanner",
    "DataStatesWriter",
    "IncompleteCheckpointError",
    "MissingKeysError",
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "install_optimizer_guard",
    "wait_staged",
]
