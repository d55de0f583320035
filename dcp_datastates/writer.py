"""``DataStatesWriter``: DCP ``StorageWriter`` for the DataStates-LLM write path.

Data flow of one save, per rank: **plan** (State Providers lay out every item at a
fixed offset) -> **stage** (tensors stream through the reusable host buffer pool)
-> **write** (full buffers go to the io_uring or pwrite engine as large aligned
writes, while Python objects are pickled to a side file on their own thread)
-> **commit** (coordinator writes ``.metadata`` atomically, see ``commit.py``).

The files are stock DCP files: ``FileSystemReader`` can load them.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dcp_datastates.buffer_pool import HostBufferPool
from dcp_datastates.checksums import FileChecksums, checksum_file_name, checksums_of, write_checksum_file
from dcp_datastates.chunk_stream import ChunkedFileStream
from dcp_datastates.commit import (
    commit_metadata,
    has_complete_checkpoint,
    prepare_directory,
    remove_stale_files,
)
from dcp_datastates.config import DataStatesConfig
from dcp_datastates.errors import CheckpointExistsError
from dcp_datastates.framing import tensor_bytes_view
from dcp_datastates.layout import RankLayout
from dcp_datastates.native import WriteEngine, create_engine, open_for_write
from dcp_datastates.planner import plan_layout


@dataclass(frozen=True)
class FilePrefix:
    """Per-rank file-name prefix, unique to one save so overwrites never touch live files."""

    prefix: str


@dataclass
class SaveStats:
    """What the last ``write_data`` on this rank did (for tests, benchmarks and logs)."""

    engine: str = ""
    tensor_bytes: int = 0
    tensor_writes: int = 0
    object_bytes: int = 0
    files: tuple[str, ...] = ()


def validate_directory_id(checkpoint_id: str | os.PathLike) -> bool:
    """A local path whose nearest existing ancestor is writable (same rule as stock DCP)."""
    if isinstance(checkpoint_id, Path):
        return True
    if "://" in str(checkpoint_id):
        return False
    return any(p.exists() and os.access(p, os.W_OK) for p in Path(checkpoint_id).parents)


class DataStatesWriter(StorageWriter):
    """Write DCP checkpoints through a pinned buffer pool and an io_uring/pwrite engine.

    Args:
        path: checkpoint directory (created if missing).
        config: :class:`DataStatesConfig`; defaults if omitted.
        overwrite: replace a complete checkpoint already in ``path``. The old one stays
            intact and loadable until the new one commits.
    """

    def __init__(self, path: str | os.PathLike, config: DataStatesConfig | None = None, *, overwrite: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.config = config if config is not None else DataStatesConfig()
        self.overwrite = overwrite
        self.save_id = uuid.uuid4().hex
        self.rank = 0
        self.is_coordinator = True
        self.last_stats = SaveStats()

    # -- StorageWriter: set-up and planning ------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank") or 0
        if not kwargs.get("use_collectives", True):
            raise ValueError(
                "DataStatesWriter needs rank coordination (use_collectives=True) to commit one "
                ".metadata atomically; drop use_collectives=False."
            )

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path), save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return validate_directory_id(checkpoint_id)

    @property
    def checkpoint_id(self) -> Path:
        return self.path

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        prepare_directory(self.path)
        if has_complete_checkpoint(self.path) and not self.overwrite:
            raise CheckpointExistsError(
                f"{str(self.path)!r} already holds a complete checkpoint (.metadata present). "
                "Save to a new directory, or pass DataStatesWriter(path, overwrite=True) to replace it "
                "(the old checkpoint stays intact until the new one is committed)."
            )
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        tag = self.save_id[:8]
        return [_with_storage_data(plan, FilePrefix(f"__{rank}_{tag}_")) for rank, plan in enumerate(plans)]

    # -- StorageWriter: the write step -------------------------------------------------------
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix: FilePrefix = plan.storage_data
        layout = plan_layout(planner, plan.items, prefix.prefix)
        engine = create_engine(
            self.config.io_engine, io_threads=self.config.io_threads, queue_depth=self.config.queue_depth
        )
        created: list[Path] = []
        checksums: dict[str, FileChecksums] = {}
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcp-datastates-objects") as objects_thread:
                objects = objects_thread.submit(self._write_objects, layout, planner, created, checksums)
                tensor_results = self._write_tensors(layout, planner, engine, created, checksums)
                results = tensor_results + objects.result()
            if self.config.checksums and checksums:
                checksum_path = self.path / checksum_file_name(prefix.prefix)
                created.append(checksum_path)
                write_checksum_file(checksum_path, checksums, fsync=self.config.fsync)
        except BaseException:
            for path in created:  # a failed save leaves nothing behind that could be mistaken for data
                path.unlink(missing_ok=True)
            raise
        finally:
            engine.close()
        self.last_stats.engine = engine.name
        self.last_stats.files = tuple(p.name for p in created)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _pool(self) -> HostBufferPool:
        pin = torch.cuda.is_available()
        return HostBufferPool.shared(self.config.chunk_bytes, self.config.pool_buffers, pin)

    def _write_tensors(
        self,
        layout: RankLayout,
        planner: SavePlanner,
        engine: WriteEngine,
        created: list[Path],
        checksums: dict[str, FileChecksums],
    ) -> list[WriteResult]:
        if not layout.tensor_records:
            return []
        path = self.path / layout.tensor_file
        target = open_for_write(str(path), self.config.direct_io)
        created.append(path)
        block_bytes = self.config.checksum_block_bytes
        stream = ChunkedFileStream(target, engine, self._pool(), block_bytes if self.config.checksums else None)
        results = []
        try:
            for record in layout.tensor_records:
                assert stream.position == record.offset
                tensor = planner.resolve_data(record.item)
                _check_tensor_matches(record.item, tensor)
                stream.write_bytes(record.framing.prefix)
                stream.write_tensor(tensor_bytes_view(tensor))
                stream.write_bytes(record.framing.suffix)
                results.append(_write_result(record.item, layout.tensor_file, record.offset, record.framing.total_bytes))
        except BaseException:
            stream.abort()
            raise
        size = stream.close(fsync=self.config.fsync)
        if size != layout.tensor_file_bytes:
            raise RuntimeError(f"wrote {size} bytes to {path}, layout planned {layout.tensor_file_bytes}")
        self.last_stats.tensor_bytes = size
        self.last_stats.tensor_writes = stream.writes_submitted
        checksums[layout.tensor_file] = FileChecksums(size, block_bytes, tuple(stream.checksums))
        return results

    def _write_objects(
        self, layout: RankLayout, planner: SavePlanner, created: list[Path], checksums: dict[str, FileChecksums]
    ) -> list[WriteResult]:
        """Pickle non-tensor state into the rank's object file; runs beside the tensor stream."""
        if not layout.object_items:
            return []
        contents = bytearray()
        results = []
        for item in layout.object_items:
            payload = planner.resolve_data(item).getbuffer()
            results.append(_write_result(item, layout.object_file, len(contents), len(payload)))
            contents += payload
        path = self.path / layout.object_file
        created.append(path)
        with open(path, "wb") as f:
            f.write(contents)
            f.flush()
            if self.config.fsync:
                os.fsync(f.fileno())
        self.last_stats.object_bytes = len(contents)
        checksums[layout.object_file] = checksums_of(contents, self.config.checksum_block_bytes)
        return results

    # -- StorageWriter: the commit step ------------------------------------------------------
    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        metadata.storage_data = storage_data
        metadata.storage_meta = self.storage_meta()
        metadata.version = "1.0.0"
        commit_metadata(self.path, metadata, self.save_id[:8], fsync=self.config.fsync)
        remove_stale_files(self.path, current_tag=self.save_id[:8])


def _with_storage_data(plan: SavePlan, storage_data: Any) -> SavePlan:
    return dataclasses.replace(plan, storage_data=storage_data)


def _write_result(item: WriteItem, relative_path: str, offset: int, length: int) -> WriteResult:
    return WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(relative_path, offset, length))


def _check_tensor_matches(item: WriteItem, tensor: Any) -> None:
    data = item.tensor_data
    assert data is not None
    expected = tuple(data.chunk.sizes)
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != expected:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(
            f"{item.index.fqn!r}: planner resolved {shape}, but the plan expects shape {expected}; "
            "was the state dict changed between planning and writing?"
        )
    if tensor.dtype != data.properties.dtype:
        raise ValueError(f"{item.index.fqn!r}: planner resolved {tensor.dtype}, plan expects {data.properties.dtype}")
