"""A rank's snapshot: its state copied out of the live tensors and on to disk (stage -> write).

A snapshot runs on its own thread. It pickles the Python objects first (small, and
they may change the moment training resumes), then streams every tensor record in
layout order through the shared pool buffers into the write engine. Two futures tell
the caller what it needs to know:

* ``planned`` -- the snapshot's local plan is made (on its own thread, never the
  caller's): which items it writes and which it holds for the global plan (``replicas``).
* ``staged`` -- every byte has been copied out of the live state: from now on the
  training loop may mutate parameters and optimizer state (DataStates' lazy snapshot:
  training waits for this only right before the optimizer step; while any snapshot of
  the process is not staged, every ``torch.optim`` step waits -- see ``capture``).
* ``done`` -- every file is written and fsynced, with the location of each record.

Device tensors are copied on a dedicated CUDA stream (on the caller's GPU, ordered
after everything training queued before the save) into pinned pool buffers; each full
buffer is written once its copies have finished (an event per buffer, see
``chunk_stream``), so the disk starts on the first region while later regions are still
being copied, and ``staged`` waits for the copies alone, never for checksums or disk.
"""

from __future__ import annotations

import contextlib
import io  # noqa: F401 - named in the Resolver alias
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import WriteItem

from dcp_datastates import step_guard
from dcp_datastates.buffer_pool import HostBufferPool
from dcp_datastates.checksums import FileChecksums, checksums_of
from dcp_datastates.chunk_stream import ChunkedFileStream
from dcp_datastates.config import DataStatesConfig
from dcp_datastates.dir_files import CheckpointDir
from dcp_datastates.errors import DataStatesError
from dcp_datastates.framing import can_frame, serialize_whole, tensor_bytes_view
from dcp_datastates.held import HeldItem
from dcp_datastates.layout import RankLayout
from dcp_datastates.native import create_engine, open_for_write
from dcp_datastates.native.workers import start_without_interrupts
from dcp_datastates.save_claim import DirectoryIdentity
from dcp_datastates.shutdown import InFlightSave, check_not_abandoned

Resolver = Callable[[WriteItem], "torch.Tensor | io.BytesIO"]
#: The pool for a state of this many tensor bytes (the pool helper may size it to the state).
PoolFor = Callable[[int], HostBufferPool]

_in_flight: set["Snapshot"] = set()
_in_flight_lock = threading.Lock()


def wait_all_staged() -> None:
    """Wait until no snapshot of this process still reads live state (errors surface on ``done``)."""
    with _in_flight_lock:
        snapshots = list(_in_flight)
    for snapshot in snapshots:
        snapshot.begin()
    wait([snapshot.staged for snapshot in snapshots])  # a failed snapshot reports through its save's own future


def any_reading_live_state() -> bool:
    return bool(_in_flight)


# Every torch.optim step waits while a snapshot of this process reads live state (see step_guard).
step_guard.wait_for_snapshots = wait_all_staged
step_guard.snapshots_reading = any_reading_live_state


@dataclass
class SnapshotPlan:
    """What a snapshot writes now (``layout``) and what it copies to hold for the global plan."""

    layout: RankLayout
    resolve: Resolver
    held: list[WriteItem] = field(default_factory=list)
    #: ``id`` of tensors that are already private copies (captured): held without a second copy.
    private_ids: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class RecordLocation:
    relative_path: str
    offset: int
    length: int


@dataclass
class SnapshotResult:
    """Where each record went, and what the snapshot did (for tests, benchmarks and logs)."""

    records: dict[MetadataIndex, RecordLocation] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    engine: str = ""
    tensor_bytes: int = 0
    tensor_writes: int = 0
    object_bytes: int = 0
    #: Asynchronous device-to-host copies queued on the copy stream (0 for host-only state).
    device_copies: int = 0
    #: Per-buffer CUDA events the sealer waited on before checksumming and writing a buffer.
    copy_events: int = 0
    #: Seconds from the first tensor copy queued until every copy had landed (``finish_copies``):
    #: the tensor bytes over this is the snapshot's copy rate (device-to-host on a GPU).
    copy_seconds: float = 0.0
    #: items copied to host memory, written by ``write_data`` if the global plan gives them to this rank.
    held: dict[MetadataIndex, HeldItem] = field(default_factory=dict)
    #: block checksums of every file written (the writer writes the side file once the save's files are final).
    checksums: dict[str, FileChecksums] = field(default_factory=dict)


class Snapshot:
    def __init__(
        self,
        directory: Path,
        layout: RankLayout | None,
        resolve: Resolver | None,
        config: DataStatesConfig,
        pool: HostBufferPool | PoolFor,
        *,
        plan: Callable[[], SnapshotPlan] | None = None,
        identity: DirectoryIdentity | None = None,
        interrupt: InFlightSave | None = None,
    ) -> None:
        """Either ``layout`` and ``resolve`` (planned already), or ``plan``, run first on the snapshot's thread.

        ``identity`` is the directory the save claimed (``save_claim``): every file is created
        through a descriptor of that very directory (``dir_files``), so a directory removed or
        replaced before the snapshot runs fails it with a typed error, and no file is created
        anywhere else. ``interrupt``: the save this snapshot belongs to; once it is abandoned
        every stage stops at its next step and the snapshot removes its files.
        """
        self.directory = directory
        self._identity = identity
        self._dir: CheckpointDir | None = None
        self.interrupt = interrupt
        self._plan = plan
        self.held: list[WriteItem] = []
        self._private_ids: set[int] = set()
        if plan is None:
            assert layout is not None and resolve is not None
            self._set_plan(SnapshotPlan(layout, resolve))
        self._config = config
        self._pool_for = pool if callable(pool) and not isinstance(pool, HostBufferPool) else (lambda _bytes: pool)
        self.planned: Future[tuple[frozenset[MetadataIndex], frozenset[MetadataIndex]]] = Future()
        self.staged: Future[None] = Future()
        self._begin = threading.Event()
        self.done: Future[SnapshotResult] = Future()
        self._created: list[tuple[Path, tuple[int, int]]] = []  # our files, with the (device, inode) we created
        self._objects_pickled = threading.Event()
        self._thread: threading.Thread | None = None
        # CUDA state is per thread: note the caller's device and stream now, on the caller's thread.
        # No CUDA context yet means no tensor can live on a GPU, and none is created here.
        self._cuda_device: int | None = None
        self._stream_ready: torch.cuda.Event | None = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda_device = torch.cuda.current_device()
            # Copies must see every kernel the training stream queued before the save started.
            self._stream_ready = torch.cuda.Event()
            self._stream_ready.record(torch.cuda.current_stream())

    # -- running ------------------------------------------------------------------------------
    def start(self, *, begin_within: float = 0.0) -> "Snapshot":
        """Run on a thread of its own; with ``begin_within``, wait up to that long for ``begin()`` first.

        Planning is pure Python: started at once, it would hold the GIL against the caller
        while the caller is still inside ``dcp.async_save`` (making the call itself slower).
        The writer calls ``begin()`` when ``async_save`` is about to return; anyone who
        waits for the snapshot (``wait_all_staged``, ``wait_staged``) calls it too.
        """
        with _in_flight_lock:
            _in_flight.add(self)
        self.staged.add_done_callback(lambda _: self._leave_in_flight())
        if self.interrupt is not None:  # a SIGTERM handler waits for this thread to stop (and clean up)
            stopped = threading.Event()
            self.interrupt.workers.append(stopped)
            self.done.add_done_callback(lambda _: stopped.set())
        if not begin_within:
            self._begin.set()

        def run_when_begun() -> None:
            self._begin.wait(begin_within)
            self.run()

        self._thread = threading.Thread(target=run_when_begun, name="dcp-datastates-snapshot", daemon=True)
        start_without_interrupts(self._thread)
        return self

    def begin(self) -> None:
        """Let a started snapshot begin now (a no-op once it has)."""
        self._begin.set()

    def _leave_in_flight(self) -> None:
        with _in_flight_lock:
            _in_flight.discard(self)

    def run(self) -> None:
        """Write everything; on failure remove what was written and fail both futures."""
        result = SnapshotResult()
        checksums: dict[str, FileChecksums] = {}
        try:
            check_not_abandoned(self.interrupt)
            self._dir = (self._identity or DirectoryIdentity.of(self.directory)).open_dir()
            if self._plan is not None:
                self._set_plan(self._plan())  # DCP's local plan and the layout: here, off the caller's thread
            self._pool = self._pool_for(self.layout.tensor_file_bytes)
            written = [r.item.index for r in self.layout.tensor_records] + [i.index for i in self.layout.object_items]
            self.planned.set_result((frozenset(written), frozenset(item.index for item in self.held)))
            # Objects are pickled on their own thread while the tensor bytes stream.
            objects = _ObjectsThread(self._write_objects, result, checksums, self._cuda_device)
            try:
                self._write_tensors(result, checksums)
            finally:
                self._objects_pickled.set()  # never leave the tensor side waiting on a failed pickle
                objects.join()
            objects.raise_if_failed()
            if not self.staged.done():
                self.staged.set_result(None)
            if self._config.checksums:
                result.checksums = checksums
            result.files = [p.name for p, _ in self._created]
        except BaseException as exc:  # noqa: BLE001 - delivered through the futures
            self.discard()
            self._close_dir()
            if not self.planned.done():
                self.planned.set_exception(exc)
            if not self.staged.done():
                self.staged.set_exception(exc)
            self.done.set_exception(exc)
            return
        self._close_dir()
        self.done.set_result(result)

    def _close_dir(self) -> None:
        directory, self._dir = self._dir, None
        if directory is not None:
            directory.close()

    def _set_plan(self, plan: SnapshotPlan) -> None:
        self.layout = plan.layout
        self._resolve = plan.resolve
        self.held = plan.held
        self._private_ids = plan.private_ids

    def discard(self) -> None:
        """Remove this snapshot's files: a failed save leaves nothing that could pass for data.

        Only from the directory the save claimed, and only names that still name the file this
        snapshot created: a directory that replaced it, or an entry put in place of one of ours,
        is left as it is.
        """
        if not self._created:
            return
        directory = self._dir
        if directory is None:
            try:
                directory = (self._identity or DirectoryIdentity.of(self.directory)).open_dir()
            except DataStatesError:
                return  # removed or replaced: none of our files is left to remove
        try:
            for path, inode in self._created:
                directory.remove(path.name, inode)
        finally:
            if directory is not self._dir:
                directory.close()

    # -- objects ------------------------------------------------------------------------------
    def _write_objects(self, result: SnapshotResult, checksums: dict[str, FileChecksums]) -> None:
        contents = bytearray()
        try:
            for item in self.layout.object_items:
                check_not_abandoned(self.interrupt)
                payload = _whole_record(item, self._resolve(item))
                result.records[item.index] = RecordLocation(self.layout.object_file, len(contents), len(payload))
                contents += payload
        finally:
            self._objects_pickled.set()  # the live objects are no longer read
        if not self.layout.object_items:
            return
        assert self._dir is not None
        name = self.layout.object_file
        fd = self._dir.create(name)
        self._created.append((self.directory / name, _inode(fd)))  # ours: only now may a failed save remove it
        self._dir.write_into(fd, name, contents, self._config.fsync)
        result.object_bytes = len(contents)
        checksums[self.layout.object_file] = checksums_of(contents, self._config.checksum_block_bytes)

    # -- tensors ------------------------------------------------------------------------------
    def _write_tensors(self, result: SnapshotResult, checksums: dict[str, FileChecksums]) -> None:
        if not self.layout.tensor_records:
            if self.held:
                copy_stream = self._copy_stream()
                with torch.cuda.stream(copy_stream) if copy_stream is not None else contextlib.nullcontext():
                    self._copy_held(result, copy_stream)
                if copy_stream is not None:
                    copy_stream.synchronize()
            return
        engine = create_engine(self._config.io_engine, io_threads=self._config.io_threads, queue_depth=self._config.queue_depth)
        result.engine = engine.name
        try:
            path = self.directory / self.layout.tensor_file
            assert self._dir is not None
            with self._dir.creating(path.name):
                target = open_for_write(str(path), self._config.direct_io, dir_fd=self._dir.fd)
            self._created.append((path, _inode(target.fd)))
            block_bytes = self._config.checksum_block_bytes
            copy_stream = self._copy_stream()
            stream = ChunkedFileStream(
                target, engine, self._pool, block_bytes if self._config.checksums else None, copy_stream, self.interrupt
            )
            try:
                copies_began = time.perf_counter()
                # On the copy stream, a non-contiguous tensor's packing copy also stays off the training stream.
                with torch.cuda.stream(copy_stream) if copy_stream is not None else contextlib.nullcontext():
                    for record in self.layout.tensor_records:
                        tensor = self._resolve(record.item)
                        _check_tensor_matches(record.item, tensor)
                        stream.write_bytes(record.framing.prefix)
                        stream.write_tensor(tensor_bytes_view(tensor))  # type: ignore[arg-type]
                        stream.write_bytes(record.framing.suffix)
                        result.records[record.item.index] = RecordLocation(
                            self.layout.tensor_file, record.offset, record.framing.total_bytes
                        )
                    self._copy_held(result, copy_stream)  # after the stream's copies: the disk starts first
                stream.finish_copies()
                if copy_stream is not None and self.held:
                    copy_stream.synchronize()
                result.copy_seconds = time.perf_counter() - copies_began
            except BaseException:
                stream.abort()
                raise
            self._objects_pickled.wait()
            self.staged.set_result(None)  # nothing is read from the live state after this point
            size = stream.close(fsync=self._config.fsync)
        finally:
            engine.close()
        if size != self.layout.tensor_file_bytes:
            raise RuntimeError(f"wrote {size} bytes to {path}, layout planned {self.layout.tensor_file_bytes}")
        result.tensor_bytes = size
        result.tensor_writes = stream.writes_submitted
        result.device_copies, result.copy_events = stream.device_copies, stream.copy_events
        checksums[self.layout.tensor_file] = FileChecksums(size, block_bytes, tuple(stream.checksums), stream.checksum_algorithm)

    def _copy_held(self, result: SnapshotResult, copy_stream: "torch.cuda.Stream | None") -> None:
        """Copy every held item out of the live state into host memory of its own (never the pool)."""
        for item in self.held:
            obj = self._resolve(item)
            if item.tensor_data is None or not can_frame(item.tensor_data.properties.dtype):
                # an object's pickle, or a tensor our framing cannot hold (quantized), serialized whole now
                result.held[item.index] = HeldItem(item, payload=bytes(_whole_record(item, obj)))
                continue
            _check_tensor_matches(item, obj)
            flat = tensor_bytes_view(obj)  # type: ignore[arg-type]
            if flat.device.type == "cpu":
                # A captured tensor is a private copy already; anything else is live and copied now.
                private = id(obj) in self._private_ids and flat.data_ptr() == obj.data_ptr()  # type: ignore[union-attr]
                host = flat if private else flat.clone()
            elif copy_stream is not None and flat.device == copy_stream.device:
                host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
                flat.record_stream(copy_stream)
                host.copy_(flat, non_blocking=True)  # on the copy stream; synchronized before staged
            else:
                host = flat.to("cpu")
            result.held[item.index] = HeldItem(item, tensor=host)

    def _copy_stream(self) -> "torch.cuda.Stream | None":
        """The caller's GPU's copy stream, ordered after what training queued before the save."""
        if self._cuda_device is None:
            return None
        torch.cuda.set_device(self._cuda_device)  # this (snapshot) thread starts on device 0
        stream = dedicated_copy_stream(self._cuda_device)
        assert self._stream_ready is not None
        stream.wait_event(self._stream_ready)
        return stream


_copy_streams: dict[int, "torch.cuda.Stream"] = {}
_copy_streams_lock = threading.Lock()
_CUDA_STREAM_NON_BLOCKING = 1  # cudaStreamNonBlocking: no implicit sync with the legacy default stream


def dedicated_copy_stream(device: int) -> "torch.cuda.Stream":
    """One copy stream per device for the life of the process, shared by every save.

    ``torch.cuda.Stream()`` hands out streams round-robin from a small per-device pool that
    NCCL, FSDP and other libraries draw from too: a new one per save may alias a stream in
    use and queue our copies behind their work (or theirs behind ours). So the stream is
    created outside that pool (``cudaStreamCreateWithFlags`` in the libcudart torch
    loaded, non-blocking like torch's own) once per device; only where that runtime cannot
    be reached is one pool stream drawn -- once, not per save.
    """
    with _copy_streams_lock:
        stream = _copy_streams.get(device)
        if stream is None:
            stream = _copy_streams[device] = _create_stream_outside_pool(device) or torch.cuda.Stream(device=device)
        return stream


def _create_stream_outside_pool(device: int) -> "torch.cuda.Stream | None":
    import ctypes
    import logging

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
        if len(paths) != 1:  # statically linked, or two runtimes: do not guess which one torch uses
            raise OSError(f"found {len(paths)} libcudart libraries loaded")
        cudart = ctypes.CDLL(paths.pop())
        create = cudart.cudaStreamCreateWithFlags
        create.argtypes, create.restype = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint], ctypes.c_int
        handle = ctypes.c_void_p()
        with torch.cuda.device(device):
            status = create(ctypes.byref(handle), _CUDA_STREAM_NON_BLOCKING)
        if status != 0 or not handle.value:
            cudart.cudaGetLastError()  # clear the error so torch's next check does not report it
            raise OSError(f"cudaStreamCreateWithFlags returned {status}")
    except (OSError, AttributeError) as exc:
        logging.getLogger("dcp_datastates").info(
            "dcp_datastates: using a stream from torch's pool for device copies on cuda:%d (%s)", device, exc
        )
        return None
    return torch.cuda.ExternalStream(handle.value, device=torch.device("cuda", device))


class _ObjectsThread:
    """Run ``write_objects`` on a plain thread (never an executor: see ``shutdown``) and keep its error."""

    def __init__(self, write_objects: Callable[..., None], *args: object) -> None:
        *call_args, cuda_device = args
        self._error: BaseException | None = None

        def run() -> None:
            try:
                if cuda_device is not None:  # pickling a CUDA tensor touches CUDA from this thread
                    torch.cuda.set_device(cuda_device)
                write_objects(*call_args)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the snapshot thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="dcp-datastates-objects", daemon=True)
        start_without_interrupts(self._thread)

    def join(self) -> None:
        self._thread.join()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def _inode(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _whole_record(item: WriteItem, value: object) -> bytes | memoryview:
    """A record serialized whole: an object's pickle (the planner's ``BytesIO``), or a tensor as stock writes it."""
    if item.tensor_data is None:
        return value.getbuffer()  # type: ignore[union-attr]
    _check_tensor_matches(item, value)
    return serialize_whole(value)  # type: ignore[arg-type]


def _check_tensor_matches(item: WriteItem, tensor: object) -> None:
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
