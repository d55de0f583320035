"""``DataStatesReader``: DCP ``StorageReader`` for checkpoints of ours or of stock DCP.

Read flow: read plan (DCP's planner picks which stored chunks feed which local
tensors, resharding included) -> read (per file, records in offset order, gathered
into large block-aligned windows so thousands of small records cost a few reads)
-> verify (every block of a window against the checksums recorded at save time,
when the checkpoint has them) -> deliver (``torch.load(weights_only=True)`` per tensor
record, a copy of the requested slice into the destination; object records are
checked for safe unpickling first).
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from dcp_datastates.checksums import FileChecksums, keys_overlapping
from dcp_datastates.commit import METADATA_FILE
from dcp_datastates.directory import DirectoryCheckpointId
from dcp_datastates.errors import (
    CheckpointIOError,
    CheckpointPathError,
    ChecksumMismatchError,
    DataStatesError,
    IncompleteCheckpointError,
)
from dcp_datastates.metadata_check import (
    ChecksumSet,
    data_file_problems,
    load_verified_checksums,
    read_checkpoint_metadata,
    validate_metadata,
)
from dcp_datastates.safe_pickle import check_object_record

#: Largest read issued at once; records are gathered up to this size per read.
READ_WINDOW_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class _Window:
    start: int
    end: int
    items: list[ReadItem]


class DataStatesReader(DirectoryCheckpointId, StorageReader):
    """Load a DCP checkpoint directory (written by ``DataStatesWriter`` or ``FileSystemWriter``).

    Args:
        path: checkpoint directory.
        verify_checksums: check every byte read against the checksums recorded at save time
            (checkpoints written by stock DCP have none and load unverified).
        trust_checkpoint: allow unpickling arbitrary Python objects from the checkpoint. Off by
            default: only what ``torch.load(weights_only=True)`` accepts is loaded.
    """

    def __init__(self, path: str | os.PathLike, *, verify_checksums: bool = True, trust_checkpoint: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.verify_checksums = verify_checksums
        self.trust_checkpoint = trust_checkpoint
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}
        self.checksums: dict[str, FileChecksums] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)
        self.storage_data = {}
        self.checksums = {}

    # -- read plan ---------------------------------------------------------------------------
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checked ``.metadata`` (see ``metadata_check``): nothing in it is acted on before this.

        Parses it safely, checks its structure, that it belongs to this directory's data
        files and that they exist with the sizes it and the checksums imply, and loads the
        checksums it vouches for -- all before DCP's planner sizes a single tensor from it.

        DCP's loader replaces any exception from ``read_metadata`` with a bare
        ``AssertionError`` carrying only its text. So when DCP's loader is the caller, a
        failure is deferred: it gets an empty ``Metadata`` (nothing to plan from) and
        ``set_up_storage_reader`` -- which DCP calls before acting on any item -- raises
        the typed error, which DCP then reports as is.
        """
        try:
            metadata = read_checkpoint_metadata(self.path, trust=self.trust_checkpoint)
            self._check_metadata_matches_files(metadata)
        except DataStatesError as exc:
            if sys._getframe(1).f_globals.get("__name__") != "torch.distributed.checkpoint.state_dict_loader":
                raise
            placeholder = Metadata(state_dict_metadata={}, planner_data={}, storage_data={}, storage_meta=StorageMeta())
            self._deferred_error = (id(placeholder), exc)
            return placeholder
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        deferred = getattr(self, "_deferred_error", None)
        if deferred is not None and deferred[0] == id(metadata):
            self._deferred_error = None
            raise deferred[1]
        if getattr(self, "_checked", None) != (self.path, id(metadata)):  # not from our read_metadata
            validate_metadata(metadata, str(self.path / METADATA_FILE), trust=self.trust_checkpoint)
            self._check_metadata_matches_files(metadata)
        self.storage_data = metadata.storage_data

    def _check_metadata_matches_files(self, metadata: Metadata) -> None:
        """Refuse a ``.metadata`` that does not describe this directory's files; load the checksums it vouches for.

        A ``.metadata`` copied from another checkpoint references files this directory
        lacks; a damaged or tampered checksum file, or data file of the wrong size, is named.
        """
        referenced = {info.relative_path for info in metadata.storage_data.values()}
        present = {p.name for p in self.path.iterdir() if p.name.endswith(".distcp")}
        if referenced and present and not referenced & present:
            raise IncompleteCheckpointError(
                f"{self.path / METADATA_FILE} does not belong to the data files in {str(self.path)!r}: it references "
                f"{sorted(referenced)[:3]}, the directory holds {sorted(present)[:3]}. Was .metadata copied from "
                "another checkpoint? Restore the matching .metadata or load the checkpoint it came from."
            )
        checksums = load_verified_checksums(self.path, metadata) if self.verify_checksums else ChecksumSet()
        problems = checksums.problems or data_file_problems(self.path, metadata, checksums.files)
        if problems:
            raise problems[0].exception()
        self.checksums = checksums.files
        self._checked = (self.path, id(metadata))

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    # -- read, verify, deliver -----------------------------------------------------------------
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

    def _windows(self, items: list[ReadItem], block_bytes: int, file_size: int | None) -> list[_Window]:
        """Group offset-sorted records into reads of at most READ_WINDOW_BYTES, block-aligned."""
        windows: list[_Window] = []
        for item in items:
            info = self.storage_data[item.storage_index]
            start = info.offset // block_bytes * block_bytes
            end = -(-(info.offset + info.length) // block_bytes) * block_bytes
            if file_size is not None:
                end = min(end, file_size)
            last = windows[-1] if windows else None
            if last is not None and start <= last.end and max(end, last.end) - last.start <= READ_WINDOW_BYTES:
                last.items.append(item)  # in place: rebuilding the list per record made planning quadratic
                windows[-1] = _Window(last.start, max(end, last.end), last.items)
            else:
                windows.append(_Window(start, end, [item]))
        return windows

    def _read_file(self, relative_path: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        path = self.path / relative_path
        checksums = self.checksums.get(relative_path)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise CheckpointIOError(
                f"data file {relative_path!r} of checkpoint {str(self.path)!r} is missing "
                f"(needed by {items[0].storage_index.fqn!r}); the checkpoint is damaged"
            ) from exc
        try:
            size = os.fstat(fd).st_size
            if checksums is not None and size != checksums.size:
                raise ChecksumMismatchError(
                    f"{relative_path} is {'truncated' if size < checksums.size else 'longer than saved'}: {size} bytes, "
                    f"saved with {checksums.size} (holds {items[0].storage_index.fqn!r}); the checkpoint is damaged"
                )
            block_bytes = checksums.block_bytes if checksums is not None else 4096
            for window in self._windows(items, block_bytes, checksums.size if checksums else None):
                data = memoryview(os.pread(fd, window.end - window.start, window.start))
                if checksums is not None:
                    self._verify(window, data, checksums, relative_path)
                for item in window.items:
                    info = self.storage_data[item.storage_index]
                    record = data[info.offset - window.start : info.offset - window.start + info.length]
                    if len(record) != info.length:
                        raise CheckpointIOError(
                            f"{item.storage_index.fqn!r}: {relative_path} is truncated (wanted {info.length} bytes "
                            f"at offset {info.offset}, got {len(record)}); the checkpoint is damaged"
                        )
                    self._deliver(item, record, relative_path, info, planner)
        finally:
            os.close(fd)

    def _verify(self, window: _Window, data: memoryview, checksums: FileChecksums, relative_path: str) -> None:
        bad_blocks = checksums.bad_blocks(data, window.start)
        if not bad_blocks:
            return
        bad = bad_blocks[0]
        block_start, block_end = bad * checksums.block_bytes, (bad + 1) * checksums.block_bytes
        records = [(self.storage_data[it.storage_index].offset, self.storage_data[it.storage_index].length,
                    it.storage_index.fqn) for it in window.items]
        keys = keys_overlapping(records, block_start, block_end)
        raise ChecksumMismatchError(
            f"checksum mismatch in {relative_path} at offset {block_start} (block of {checksums.block_bytes} bytes) "
            f"holding {', '.join(repr(k) for k in keys)}: the bytes on disk are not the ones saved; the checkpoint "
            "is corrupted. Load an earlier checkpoint, or pass verify_checksums=False to read it anyway."
        )

    def _deliver(self, item: ReadItem, record: memoryview, relative_path: str, info: _StorageInfo, planner: LoadPlanner) -> None:
        if item.type == LoadItemType.BYTE_IO:
            if not self.trust_checkpoint:
                check_object_record(record, item.storage_index.fqn, relative_path, info.offset)
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
