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

import os
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

from dcp_datastates.config import DataStatesConfig
from dcp_datastates.resume import step_of
from dcp_datastates.tier_restore import find_restorable, restore
from dcp_datastates.tiers import MultiLevelConfig
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
        datastates_local_dir: str = ""
        """Multi-level checkpoints (docs/multilevel.md): a node-local directory with "{node}", e.g.
        "/local_nvme/{node}/ckpt", that receives every checkpoint first; the checkpoint folder becomes
        the shared tier, drained in the background. Empty: off."""
        datastates_partners: int = 1
        """Multi-level: copies of each node's files kept on another node (0 or 1)."""
        datastates_drain_every: int = 1
        """Multi-level: every K-th local checkpoint is drained to the checkpoint folder (0: never)."""
        datastates_drain_policy: Literal["skip", "queue_one", "wait"] = "queue_one"
        """Multi-level: a checkpoint due while the previous drain runs is skipped, queued (newest
        replaces older), or the save call waits."""
        datastates_keep_local: int = 2
        """Multi-level: committed local checkpoints kept per node."""

        def __post_init__(self) -> None:
            CheckpointManager.Config.__post_init__(self)
            if self.storage_backend not in ("datastates", "filesystem"):
                raise ValueError(
                    f"checkpoint.storage_backend must be 'datastates' or 'filesystem', got {self.storage_backend!r}"
                )
            config = self.datastates_config()  # validate now, with pydantic's messages
            if config.multilevel is not None and self.async_mode == "async_with_pinned_mem":
                raise ValueError(
                    "checkpoint.datastates_local_dir (multi-level checkpoints) runs its tier work in the training "
                    "process: use checkpoint.async_mode 'async' or 'disabled', not 'async_with_pinned_mem'")

        def datastates_config(self) -> DataStatesConfig:
            multilevel = None
            if self.datastates_local_dir:
                multilevel = MultiLevelConfig(
                    local_dir=self.datastates_local_dir, partners=self.datastates_partners,
                    drain_every=self.datastates_drain_every, drain_policy=self.datastates_drain_policy,
                    keep_local=self.datastates_keep_local)
            return DataStatesConfig(
                host_pool_bytes=self.datastates_host_pool_bytes,
                chunk_bytes=self.datastates_chunk_bytes,
                io_engine=self.datastates_io_engine,
                multilevel=multilevel,
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

    def _find_load_step(self, folder: str = "") -> int:
        """Multi-level: the newest step the job can restore from any tier, not only the drained ones."""
        if not (self.use_datastates and self.datastates_config.multilevel is not None):
            return super()._find_load_step(folder)
        choice = find_restorable(folder or self.folder, self.datastates_config)
        if choice is None:
            return -1
        # torchtitan's _load insists that the step's folder exists; a step not drained yet has none
        # (an empty directory is no checkpoint to any reader: no .metadata)
        os.makedirs(self._create_checkpoint_id(choice.step, folder), exist_ok=True)
        return choice.step

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        if from_hf or not self.use_datastates:
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        step = step_of(os.path.basename(os.path.normpath(checkpoint_id)))
        if self.datastates_config.multilevel is not None and step is not None:
            # each file from its nearest intact copy: this node's, the partner's, the shared folder
            if restore(state_dict, os.path.dirname(os.path.normpath(checkpoint_id)), self.datastates_config, step=step) is None:
                raise FileNotFoundError(f"no tier holds a complete, intact copy of {checkpoint_id}")
            if MODEL in self.states:
                self.states[MODEL].load_state_dict(state_dict)
            return
        # DataStatesReader also reads checkpoints torchtitan wrote with stock DCP (switching backends is safe).
        dcp.load(state_dict, storage_reader=DataStatesReader(checkpoint_id))
        if MODEL in self.states:
            self.states[MODEL].load_state_dict(state_dict)
