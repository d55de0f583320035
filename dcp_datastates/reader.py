"""``DataStatesReader``: DCP ``StorageReader`` for checkpoints of ours or of stock DCP.

Read flow, the mirror of the write path: **read plan** (DCP's planner picks which
stored chunks feed which local tensors, resharding included; ``read_plan`` sorts the
records by offset, widens them to checksum blocks and merges them into large aligned
windows, so thousands of small records cost a few reads) -> **read** (``read_stream``:
the windows stream through reusable page-aligned, pinned-with-CUDA buffers, several
reads in flight through the io_uring or preadv engine of ``native/``, O_DIRECT) ->
**verify** (each window's blocks against the checksums recorded at save time, as it
lands) -> **deliver** (``deliver``: tensor records in our framing are decoded in place
-- the prefix compared byte for byte, the data copied straight from the buffer into the
destination, asynchronously to a GPU -- while the next reads are in flight; other
records are decoded as stock DCP does, stream transforms included, objects checked for
safe unpickling first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from dcp_datastates.buffer_pool import HostBuffer
from dcp_datastates.checksums import FileChecksums, keys_overlapping
from dcp_datastates.commit import METADATA_FILE
from dcp_datastates.config import DataStatesConfig
from dcp_datastates.deliver import RecordDelivery
from dcp_datastates.directory import DirectoryCheckpointId
from dcp_datastates.errors import (
    CheckpointIOError,
    CheckpointPathError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    DataStatesError,
    IncompleteCheckpointError,
)
from dcp_datastates.gc_pause import gc_paused
from dcp_datastates.integrity import IntegrityPolicy
from dcp_datastates.metadata_check import (
    ChecksumSet,
    data_file_problems,
    load_verified_checksums,
    read_checkpoint_metadata,
    unverified_error,
    validate_metadata,
)
from dcp_datastates.native import create_read_engine, open_for_read
from dcp_datastates.read_plan import ReadPlan, StoredTensors, Window, classify, plan_reads, stored_tensors
from dcp_datastates.read_stream import checkout_pool, stream_windows
from dcp_datastates.shared_reads import LocalPlanInfo, SharedBatch, SharedReads, assign_shared_reads


class DataStatesReader(DirectoryCheckpointId, StorageReader):
    """Load a DCP checkpoint directory (written by ``DataStatesWriter`` or ``FileSystemWriter``).

    Args:
        path: checkpoint directory.
        verify_checksums: check every byte read against the checksums recorded at save time
            (checkpoints written by stock DCP have none and load unverified).
        trust_checkpoint: allow unpickling arbitrary Python objects from the checkpoint. Off by
            default: only what ``torch.load(weights_only=True)`` accepts is loaded.
        config: I/O settings shared with the writer: ``io_engine``/``io_threads``/``queue_depth``
            (reads in flight), ``chunk_bytes`` (one read buffer), ``direct_io``; and the integrity
            policy: ``integrity`` (``"if-present"`` or ``"required"``) and ``integrity_key`` (or the
            ``DCP_DATASTATES_INTEGRITY_KEY`` environment variable), see docs/integrity.md.
        replicated_reads: records several ranks need (replicated state) are read by one rank and
            broadcast over the default process group (``"once"``), or read by every rank that
            needs them (``"every_rank"``). ``"auto"``: once when the ranks span several hosts
            (storage shared by nodes: N readers cost N times its bandwidth), every rank on one
            host (a local disk and its page cache serve them without a network hop).
    """

    def __init__(self, path: str | os.PathLike, *, verify_checksums: bool = True, trust_checkpoint: bool = False,
                 config: DataStatesConfig | None = None,
                 replicated_reads: Literal["auto", "once", "every_rank"] = "auto") -> None:
        super().__init__()
        if path is None:
            raise CheckpointPathError(
                "DataStatesReader(path): path is None. latest_complete_checkpoint(root) returns None when the root "
                "holds no complete checkpoint yet -- a first run: start fresh instead of loading, e.g. "
                "`latest = latest_complete_checkpoint(root)` then `if latest is not None: dcp.load(..., "
                "storage_reader=DataStatesReader(latest))`."
            )
        if replicated_reads not in ("auto", "once", "every_rank"):
            raise ValueError(f"replicated_reads must be 'auto', 'once' or 'every_rank', got {replicated_reads!r}")
        self.replicated_reads = replicated_reads
        self.config = config if config is not None else DataStatesConfig()
        self.integrity = IntegrityPolicy.of(self.config)
        if self.integrity.enforced and not verify_checksums:
            raise ValueError(
                f"verify_checksums=False cannot be combined with {self.integrity.name}, which demands that every "
                "byte is verified; drop verify_checksums=False, or use DataStatesConfig(integrity='if-present', "
                "integrity_key=None) for a checkpoint you trust"
            )
        self.last_read = ReadStats()
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
            with gc_paused():
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
            with gc_paused():
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
        checksums = (load_verified_checksums(self.path, metadata, self.integrity) if self.verify_checksums
                     else ChecksumSet())
        problems = checksums.problems or data_file_problems(self.path, metadata, checksums.files)
        if problems:
            raise problems[0].exception()
        if self.integrity.enforced and checksums.unverified:
            raise unverified_error(self.path, self.integrity, checksums.unverified)
        self.checksums = checksums.files
        self._checked = (self.path, id(metadata))

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return dataclasses.replace(plan, storage_data=LocalPlanInfo(socket.gethostname()))

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """On the coordinator: give each record several ranks need one reader (see ``shared_reads``)."""
        if self.replicated_reads == "every_rank" or len(plans) < 2:
            return plans
        hosts = {p.storage_data.host for p in plans if isinstance(p.storage_data, LocalPlanInfo)}
        if self.replicated_reads == "auto" and len(hosts) < 2:
            return plans
        with gc_paused():
            shared = assign_shared_reads(plans, self.storage_data)
        return plans if shared is None else [dataclasses.replace(p, storage_data=shared) for p in plans]

    # -- read, verify, deliver -----------------------------------------------------------------
    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every record of ``plan`` (read plan -> read engine -> verify -> deliver); see the module doc."""
        self.last_read = ReadStats()
        shared = plan.storage_data if isinstance(plan.storage_data, SharedReads) else None
        with gc_paused():
            if shared is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() == shared.world_size:
                self._read_with_exchange(plan.items, planner, shared)
            elif plan.items:
                self._read_items(plan.items, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    # -- replicated state: one reader, a broadcast to the others ------------------------------------
    def _read_with_exchange(self, items: list[ReadItem], planner: LoadPlanner, shared: SharedReads) -> None:
        """Read this rank's own records, then, batch by batch, read (owner) or receive the shared ones.

        Every rank walks the same batches in the same order, so the broadcasts match. Before each
        broadcast the ranks agree that its owner read it: a rank that failed must not leave the
        others waiting in a broadcast that never comes.
        """
        rank = dist.get_rank()
        shared_indexes = shared.indexes()
        mine: dict[MetadataIndex, list[ReadItem]] = {}
        own_items = []
        for item in items:
            if item.storage_index in shared_indexes:
                mine.setdefault(item.storage_index, []).append(item)
            else:
                own_items.append(item)
        error: BaseException | None = None
        try:
            if own_items:
                self._read_items(own_items, planner)
        except BaseException as exc:  # noqa: BLE001 - re-raised after the ranks agree
            error = exc
        _agree(error, "reading its own records")
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        stored = stored_tensors(getattr(planner, "metadata", None))
        received_error: BaseException | None = None  # decoding what another rank sent; reported at the next agreement
        for batch in shared.batches:
            buffer = torch.empty(batch.nbytes, dtype=torch.uint8)
            error = received_error
            if rank == batch.owner and error is None:
                try:
                    tee = {index: position for index, position, _ in batch.records}
                    self._read_items([it for index, _, _ in batch.records for it in mine.get(index, [])], planner,
                                     (buffer, tee))
                except BaseException as exc:  # noqa: BLE001
                    error = exc
            _agree(error, f"reading replicated records for the other ranks (rank {batch.owner})")
            if device is None:
                dist.broadcast(buffer, src=batch.owner)
            else:  # NCCL moves device memory only
                on_device = buffer.to(device) if rank == batch.owner else torch.empty(batch.nbytes, dtype=torch.uint8, device=device)
                dist.broadcast(on_device, src=batch.owner)
                buffer.copy_(on_device)
            if rank == batch.owner:
                continue
            self.last_read.bytes_received += batch.nbytes
            try:
                self._deliver_received(batch, buffer, mine, stored, planner)
            except BaseException as exc:  # noqa: BLE001 - the other ranks must not wait in a broadcast for us
                received_error = exc
        _agree(received_error, "decoding replicated records it received")

    def _deliver_received(self, batch: SharedBatch, buffer: torch.Tensor, mine: dict[MetadataIndex, list[ReadItem]],
                          stored: StoredTensors, planner: LoadPlanner) -> None:
        view, address = memoryview(buffer.numpy()), buffer.data_ptr()
        for index, position, length in batch.records:
            for item in mine.get(index, []):
                delivery = RecordDelivery(classify(item, self.storage_data[index], stored.get(index)), planner,
                                          self.trust_checkpoint)
                delivery.feed(view, buffer, position, position + length, address)
                self.last_read.records += 1
                self.last_read.framed += delivery.direct

    def _read_items(self, items: list[ReadItem], planner: LoadPlanner, tee: _Tee | None = None) -> None:
        first_key: dict[str, str] = {}
        for item in items:
            first_key.setdefault(self.storage_data[item.storage_index].relative_path, item.storage_index.fqn)
        sizes: dict[str, int] = {}
        for relative_path, fqn in first_key.items():
            try:
                info = os.lstat(self._data_path(relative_path))
            except FileNotFoundError as exc:
                raise CheckpointIOError(
                    f"data file {relative_path!r} of checkpoint {str(self.path)!r} is missing "
                    f"(needed by {fqn!r}); the checkpoint is damaged"
                ) from exc
            if not stat.S_ISREG(info.st_mode):
                raise _not_regular(str(self._data_path(relative_path)), "a symbolic link" if stat.S_ISLNK(info.st_mode)
                                   else "not a regular file")
            sizes[relative_path] = info.st_size
            self._check_size(relative_path, sizes[relative_path], fqn)
        block_bytes = {name: self.checksums[name].block_bytes for name in first_key if name in self.checksums}
        read_plan = plan_reads(items, self.storage_data, stored_tensors(getattr(planner, "metadata", None)),
                               sizes, block_bytes, self.config.chunk_bytes)
        for f in read_plan.files:
            for record in f.records:
                if record.end > f.size:
                    raise CheckpointIOError(
                        f"{record.item.storage_index.fqn!r}: {f.relative_path} is truncated (wanted {record.length} "
                        f"bytes at offset {record.offset}, got {max(0, f.size - record.offset)}); the checkpoint "
                        "is damaged"
                    )
        self._stream(read_plan, planner, tee)

    def _data_path(self, relative_path: str) -> Path:
        """Where a data file is read from (a multi-level restore reads each from its nearest copy)."""
        return self.path / relative_path

    def _check_size(self, relative_path: str, size: int, fqn: str) -> None:
        checksums = self.checksums.get(relative_path)
        if checksums is not None and size != checksums.size:
            raise ChecksumMismatchError(
                f"{relative_path} is {'truncated' if size < checksums.size else 'longer than saved'}: {size} bytes, "
                f"saved with {checksums.size} (holds {fqn!r}); the checkpoint is damaged"
            )

    def _stream(self, read_plan: ReadPlan, planner: LoadPlanner, tee: _Tee | None = None) -> None:
        """Reads in flight through the engine; each window verified as it lands, then delivered in order.

        Files are opened when their first read is submitted and closed once their last window is
        delivered: a stock checkpoint of one file per tensor keeps only a few open.
        """
        config = self.config
        count = max(2, config.queue_depth)  # one geometry per config, so every load reuses the same pool
        engine = create_read_engine(config.io_engine, io_threads=config.io_threads, queue_depth=count)
        stats = self.last_read
        stats.engine = engine.name
        deliveries: dict[int, RecordDelivery] = {}
        # buffer index -> CUDA events after the copies out of it: one per destination device, each
        # on that device's current stream (where a host-to-device copy into it runs)
        gpu_copies: dict[int, list[Any]] = {}

        opened: dict[int, int] = {}
        last_window = {w.file_index: i for i, w in enumerate(read_plan.windows)}

        def open_file(index: int) -> tuple[int, str]:
            path = str(self._data_path(read_plan.files[index].relative_path))
            if index not in opened:
                try:
                    fd = open_for_read(path, config.direct_io).fd
                except FileNotFoundError as exc:
                    raise CheckpointIOError(f"data file {path!r} disappeared while loading") from exc
                except OSError as exc:  # ELOOP: a link swapped in after the checks
                    kind = {errno.ELOOP: "a symbolic link", errno.EISDIR: "not a regular file"}.get(
                        exc.errno or 0, f"unreadable ({exc.strerror})")
                    raise _not_regular(path, kind) from exc
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or directory swapped in after the checks
                    os.close(fd)
                    raise _not_regular(path, "not a regular file")
                opened[index] = fd
            return opened[index], path

        def check(window: Window, data: memoryview) -> bool:
            relative_path = read_plan.files[window.file_index].relative_path
            checksums = self.checksums.get(relative_path)
            if checksums is None:  # saved without checksums, or verify_checksums=False
                return False
            self._verify(window, data, checksums, relative_path)
            return True

        def before_reuse(buffer: HostBuffer) -> None:
            for event in gpu_copies.pop(buffer.index, ()):
                event.synchronize()

        try:
            with checkout_pool(read_plan.buffer_bytes, count, torch.cuda.is_available()) as pool, \
                    contextlib.closing(stream_windows(read_plan.windows, open_file, engine, pool, before_reuse,
                                                     check)) as landing:
                # closing(): on an error, wait for the reads in flight and return their buffers right here
                clock = time.perf_counter()
                for number, landed in enumerate(landing):
                    now = time.perf_counter()
                    stats.wait_seconds += now - clock
                    window, buffer = landed.window, landed.buffer
                    relative_path = read_plan.files[window.file_index].relative_path
                    stats.windows += 1
                    stats.bytes_read += landed.valid
                    stats.bytes_by_file[relative_path] = stats.bytes_by_file.get(relative_path, 0) + landed.valid
                    if landed.valid < window.end - window.start:
                        raise CheckpointIOError(
                            f"{relative_path} shrank while being read: wanted {window.end - window.start} bytes at "
                            f"offset {window.start}, got {landed.valid} (holds {window.records[0].item.storage_index.fqn!r}); "
                            "the checkpoint is damaged"
                        )
                    if landed.checked:  # verified as it landed, while earlier windows were delivered
                        stats.bytes_verified += landed.valid
                    stats.verify_seconds += landed.check_seconds
                    clock = now
                    devices: set[torch.device] = set()
                    address = buffer.tensor.data_ptr()
                    for record in window.records:
                        delivery = deliveries.get(id(record))
                        if delivery is None:
                            delivery = deliveries[id(record)] = RecordDelivery(record, planner, self.trust_checkpoint)
                        lo = max(record.offset, window.start) - window.start
                        hi = max(lo, min(record.end, window.end) - window.start)
                        if tee is not None and record.item.storage_index in tee[1]:  # verified bytes for other ranks
                            at = tee[1][record.item.storage_index] + max(record.offset, window.start) - record.offset
                            tee[0][at : at + hi - lo].copy_(buffer.tensor[lo:hi])
                        copies = delivery.device_copies
                        if delivery.feed(buffer.view, buffer.tensor, lo, hi, address):
                            del deliveries[id(record)]
                            stats.records += 1
                            stats.framed += delivery.direct
                        if delivery.cuda:
                            assert delivery.target is not None
                            devices.add(delivery.target.device)
                            stats.device_copies += delivery.device_copies - copies
                    if devices:
                        events = [torch.cuda.Event() for _ in devices]
                        for event, device in zip(events, devices):
                            event.record(torch.cuda.current_stream(device))
                        gpu_copies[buffer.index] = events
                        stats.copy_events += len(events)
                    now, clock = clock, time.perf_counter()
                    stats.deliver_seconds += clock - now
                    if last_window[window.file_index] == number:
                        os.close(opened.pop(window.file_index))
                for events in gpu_copies.values():
                    for event in events:
                        event.synchronize()
                stats.pinned = pool.pinned  # every buffer the load used, now that all were handed out
        finally:
            engine.close()
            for fd in opened.values():
                os.close(fd)
        if deliveries:  # every record ends inside a window; anything left means the plan is wrong
            leftover = next(iter(deliveries.values())).record
            raise CheckpointIOError(f"{leftover.item.storage_index.fqn!r}: record was not fully read (internal error)")

    def _verify(self, window: Window, data: memoryview, checksums: FileChecksums, relative_path: str) -> None:
        bad_blocks = checksums.bad_blocks(data, window.start)
        if not bad_blocks:
            return
        bad = bad_blocks[0]
        block_start, block_end = bad * checksums.block_bytes, (bad + 1) * checksums.block_bytes
        records = [(r.offset, r.length, r.item.storage_index.fqn) for r in window.records]
        keys = keys_overlapping(records, block_start, block_end)
        raise ChecksumMismatchError(
            f"checksum mismatch in {relative_path} at offset {block_start} (block of {checksums.block_bytes} bytes) "
            f"holding {', '.join(repr(k) for k in keys)}: the bytes on disk are not the ones saved; the checkpoint "
            "is corrupted. Load an earlier checkpoint, or pass verify_checksums=False to read it anyway."
        )


def _not_regular(path: str, kind: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"data file {path} is {kind} (it changed after the checkpoint was checked); data files are never read "
        "through links or from devices, so the checkpoint cannot be loaded as it is"
    )


#: Where the owner of replicated records copies them for the broadcast: (batch buffer, position per record).
_Tee = tuple[torch.Tensor, dict[MetadataIndex, int]]


def _agree(error: BaseException | None, what: str) -> None:
    """All ranks learn whether any failed; the one that failed raises its own error, the others say who."""
    failed = torch.tensor([-1 if error is None else dist.get_rank()], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        failed = failed.cuda()
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed.item()) >= 0:
        raise CheckpointIOError(f"rank {int(failed.item())} failed while {what}; its own error says why")


@dataclass
class ReadStats:
    """What the last ``read_data`` did (tests and benchmarks use it to prove which path ran)."""

    engine: str = ""
    windows: int = 0
    bytes_read: int = 0
    bytes_verified: int = 0
    bytes_received: int = 0  # replicated records received from the rank that read them
    bytes_by_file: dict[str, int] = dataclasses.field(default_factory=dict)  # bytes_read, per data file
    records: int = 0
    framed: int = 0  # tensor records decoded from our framing straight into their destination
    wait_seconds: float = 0.0  # waiting for reads to land
    verify_seconds: float = 0.0  # checksumming landed windows (on the engine's threads, beside waits and delivery)
    deliver_seconds: float = 0.0  # decoding and copying into destinations
    #: asynchronous host-to-device copies out of the (pinned) read buffers into GPU destinations
    device_copies: int = 0
    #: CUDA events recorded after a buffer's copies: it is refilled only once they have landed
    copy_events: int = 0
    pinned: bool = False  # the read buffers were pinned (so those copies really ran asynchronously)
