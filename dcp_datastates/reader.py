"""``DataStatesReader``: DCP ``StorageReader`` for checkpoints of ours or of stock DCP.

Read flow: read plan (DCP's planner picks which stored chunks feed which local
tensors, resharding included) -> read (one pass per file, in offset order) -> load
each record with ``torch.load(weights_only=True)`` and copy the requested slice into
the destination tensor.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, cast

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from dcp_datastates.commit import METADATA_FILE
from dcp_datastates.errors import CheckpointIOError, CheckpointPathError, IncompleteCheckpointError
from dcp_datastates.writer import validate_directory_id


class DataStatesReader(StorageReader):
    """Load a DCP checkpoint directory (written by ``DataStatesWriter`` or ``FileSystemWriter``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)
        self.storage_data = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return validate_directory_id(checkpoint_id)

    @property
    def checkpoint_id(self) -> Path:
        return self.path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if not self.path.exists():
            raise CheckpointPathError(f"checkpoint path {str(self.path)!r} does not exist")
        if not self.path.is_dir():
            raise CheckpointPathError(f"checkpoint path {str(self.path)!r} is a file; DCP checkpoints are directories")
        metadata_path = self.path / METADATA_FILE
        if not metadata_path.is_file():
            raise IncompleteCheckpointError(
                f"{str(self.path)!r} is not a complete checkpoint: it has no {METADATA_FILE} file. A save into it "
                "failed or is still running, or this is not a checkpoint directory; load an earlier checkpoint."
            )
        with open(metadata_path, "rb") as f:
            metadata = pickle.load(f)
        if not isinstance(metadata, Metadata):
            raise IncompleteCheckpointError(f"{metadata_path} does not hold DCP Metadata (got {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if metadata.storage_data is None:
            raise IncompleteCheckpointError(f"{self.path / METADATA_FILE} has no storage_data: not a file-system checkpoint")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in per_file.items():
            items.sort(key=lambda it: self.storage_data[it.storage_index].offset)
            self._read_file(relative_path, items, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_file(self, relative_path: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        path = self.path / relative_path
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise CheckpointIOError(
                f"data file {relative_path!r} of checkpoint {str(self.path)!r} is missing "
                f"(needed by {items[0].storage_index.fqn!r}); the checkpoint is damaged"
            ) from exc
        try:
            for item in items:
                info = self.storage_data[item.storage_index]
                record = os.pread(fd, info.length, info.offset)
                if len(record) != info.length:
                    raise CheckpointIOError(
                        f"{item.storage_index.fqn!r}: {relative_path} is truncated (wanted {info.length} bytes at "
                        f"offset {info.offset}, got {len(record)}); the checkpoint is damaged"
                    )
                self._deliver(item, record, relative_path, info, planner)
        finally:
            os.close(fd)

    def _deliver(self, item: ReadItem, record: bytes, relative_path: str, info: _StorageInfo, planner: LoadPlanner) -> None:
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(record))
            return
        try:
            stored = cast(torch.Tensor, torch.load(io.BytesIO(record), map_location="cpu", weights_only=True))
        except Exception as exc:
            raise CheckpointIOError(
                f"{item.storage_index.fqn!r}: record in {relative_path} at offset {info.offset} "
                f"({info.length} bytes) cannot be decoded ({exc}); the checkpoint is damaged"
            ) from exc
        source = narrow_tensor_by_index(stored, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != source.size():
            raise CheckpointIOError(
                f"{item.storage_index.fqn!r}: stored slice has shape {tuple(source.size())}, "
                f"destination expects {tuple(target.size())}"
            )
        target.copy_(source)
        planner.commit_tensor(item, target)
