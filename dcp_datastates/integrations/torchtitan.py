"""torchtitan integration: its checkpoint manager, saving and loading through DataStates.

torchtitan (0.3.0, the release that runs with torch 2.13) builds its checkpoint manager
from ``config.checkpoint`` via ``Config.build()``. ``DataStatesCheckpointManager.Config``
is a drop-in for ``CheckpointManager.Config`` with one more field, ``storage_backend``
(``"datastates"`` by default, ``"filesystem"`` for stock DCP); on the command line it is
``--checkpoint.storage_backend datastates``. Everything else -- intervals, keep-latest-K,
async modes, HF export -- stays torchtitan's.

Async modes map onto the lazy snapshot: ``async`` runs the save on a thread, and the
trainer's ``maybe_wait_for_staging()`` before the optimizer step waits only for the
snapshot copies; ``async_with_pinned_mem`` uses DCP's checkpoint
process with our pinned pool (no ``DefaultStager`` copy of the whole state).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

from dcp_datastates.config import DataStatesConfig
from dcp_datastates.reader import DataStatesReader
from dcp_datastates.writer import DataStatesWriter

try:
    from torchtitan.components.checkpointer.base import MODEL
    from torchtitan.components.checkpointer.dcp import AsyncMode, CheckpointManager
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dcp_datastates.integrations.torchtitan needs torchtitan (tested with torchtitan==0.3.0 and torch 2.13)"
    ) from exc


class _SnapshotStager:
    """Stands in for torchtitan's ``DefaultStager`` in pinned mode: DataStatesWriter stages itself."""

    def close(self) -> None:
        pass


class DataStatesCheckpointManager(CheckpointManager):
    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        storage_backend: Literal["datastates", "filesystem"] = "datastates"
        """Where checkpoint bytes go: DataStates (lazy snapshots, io_uring) or stock DCP files."""
        datastates_host_pool_bytes: str = "auto"
        """Host staging pool of the DataStates writer (pinned with CUDA), reused by every save: "auto"
        sizes it to this rank's checkpoint (capped by host memory), or give a size such as "4GiB"."""
        datastates_chunk_bytes: str = "32MiB"
        """Staging buffer (and write) size of the DataStates writer."""
        datastates_io_engine: Literal["auto", "io_uring", "threads"] = "auto"
        """I/O engine of the DataStates writer."""

        def __post_init__(self) -> None:
            CheckpointManager.Config.__post_init__(self)
            if self.storage_backend not in ("datastates", "filesystem"):
                raise ValueError(
                    f"checkpoint.storage_backend must be 'datastates' or 'filesystem', got {self.storage_backend!r}"
                )
            self.datastates_config()  # validate now, with pydantic's messages

        def datastates_config(self) -> DataStatesConfig:
            return DataStatesConfig(
                host_pool_bytes=self.datastates_host_pool_bytes,
                chunk_bytes=self.datastates_chunk_bytes,
                io_engine=self.datastates_io_engine,
            )

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.use_datastates = config.storage_backend == "datastates"
        self.datastates_config = config.datastates_config()
        if self.enable and self.use_datastates:
            self.stager = _SnapshotStager()  # keeps torchtitan from building a DefaultStager (a full copy)

    def dcp_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        async_mode: AsyncMode,
        enable_garbage_collection: bool = False,
        to_hf: bool = False,
    ) -> Future | AsyncSaveResponse | None:
        if to_hf or not self.use_datastates:
            return super().dcp_save(state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        writer = DataStatesWriter(checkpoint_id, self.datastates_config, overwrite=True)
        if async_mode == AsyncMode.DISABLED:
            dcp.save(state_dict, storage_writer=writer)
            return None
        checkpointer = (
            AsyncCheckpointerType.PROCESS if async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM else AsyncCheckpointerType.THREAD
        )
        response = dcp.async_save(state_dict, storage_writer=writer, process_group=self.pg, async_checkpointer_type=checkpointer)
        assert isinstance(response, AsyncSaveResponse)
        if async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM:
            return response  # torchtitan takes staging_completion and upload_completion from it
        self._snapshot_staging = response.staging_completion  # see _maybe_wait_for_staging
        return response.upload_completion

    def _maybe_wait_for_staging(self) -> None:
        # torchtitan tracks staging only in pinned mode; in "async" mode the lazy snapshot's
        # copies are still running when dcp_save returns, so the trainer's wait before the
        # optimizer step must cover them too.
        staging = getattr(self, "_snapshot_staging", None)
        if staging is not None:
            staging.result()
            self._snapshot_staging = None
        super()._maybe_wait_for_staging()

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        if from_hf or not self.use_datastates:
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        # DataStatesReader also reads checkpoints torchtitan wrote with stock DCP (switching backends is safe).
        dcp.load(state_dict, storage_reader=DataStatesReader(checkpoint_id))
        if MODEL in self.states:
            self.states[MODEL].load_state_dict(state_dict)
