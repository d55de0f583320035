"""A rank's snapshot: its state copied out of the live tensors and on to disk (stage -> write).

A snapshot runs on its own thread. It pickles the Python objects first (small, and
they may change the moment training resumes), then streams every tensor record in
layout order through the shared pool buffers into the write engine. Two futures tell
the caller what it needs to know:

* ``staged`` -- every byte has been copied out of the live state: from now on the
  training loop may mutate parameters and optimizer state (DataStates' lazy snapshot:
  training waits for this only right before the optimizer step).
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
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import WriteItem

from dcp_datastates.buffer_pool import HostBufferPool
from dcp_datastates.checksums import (
    FileChecksums,
    checksum_file_name,
    checksums_of,
    write_checksum_file,
)
from dcp_datastates.chunk_stream import ChunkedFileStream, check_still_linked
from dcp_datastates.config import DataStatesConfig
from dcp_datastates.framing import tensor_bytes_view
from dcp_datastates.layout import RankLayout
from dcp_datastates.native import create_engine, open_for_write
from dcp_datastates.shutdown import check_not_abandoned

Resolver = Callable[[WriteItem], "torch.Tensor | io.BytesIO"]

_in_flight: set["Snapshot"] = set()
_in_flight_lock = threading.Lock()


def wait_all_staged() -> None:
    """Wait until no snapshot of this process still reads live state (errors surface on ``done``)."""
    with _in_flight_lock:
        pending = [snapshot.staged for snapshot in _in_flight]
    wait(pending)  # a failed snapshot reports through its save's own future


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


class Snapshot:
    def __init__(
        self, directory: Path, layout: RankLayout, resolve: Resolver, config: DataStatesConfig, pool: HostBufferPool
    ) -> None:
        self.directory = directory
        self.layout = layout
        self._resolve = resolve
        self._config = config
        self._pool = pool
        self.staged: Future[None] = Future()
        self.done: Future[SnapshotResult] = Future()
        self._created: list[Path] = []
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
    def start(self) -> "Snapshot":
        with _in_flight_lock:
            _in_flight.add(self)
        self.staged.add_done_callback(lambda _: self._leave_in_flight())
        self._thread = threading.Thread(target=self.run, name="dcp-datastates-snapshot", daemon=True)
        self._thread.start()
        return self

    def _leave_in_flight(self) -> None:
        with _in_flight_lock:
            _in_flight.discard(self)

    def run(self) -> None:
        """Write everything; on failure remove what was written and fail both futures."""
        result = SnapshotResult()
        checksums: dict[str, FileChecksums] = {}
        try:
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
            if self._config.checksums and checksums:
                name = checksum_file_name(self.layout.file_prefix)
                self._created.append(self.directory / name)
                write_checksum_file(self.directory / name, checksums, fsync=self._config.fsync)
            result.files = [p.name for p in self._created]
        except BaseException as exc:  # noqa: BLE001 - delivered through the futures
            self.discard()
            if not self.staged.done():
                self.staged.set_exception(exc)
            self.done.set_exception(exc)
            return
        self.done.set_result(result)

    def discard(self) -> None:
        """Remove this snapshot's files: a failed save leaves nothing that could pass for data."""
        for path in self._created:
            path.unlink(missing_ok=True)

    # -- objects ------------------------------------------------------------------------------
    def _write_objects(self, result: SnapshotResult, checksums: dict[str, FileChecksums]) -> None:
        contents = bytearray()
        try:
            for item in self.layout.object_items:
                check_not_abandoned()
                payload = self._resolve(item).getbuffer()  # type: ignore[union-attr]
                result.records[item.index] = RecordLocation(self.layout.object_file, len(contents), len(payload))
                contents += payload
        finally:
            self._objects_pickled.set()  # the live objects are no longer read
        if not self.layout.object_items:
            return
        path = self.directory / self.layout.object_file
        self._created.append(path)
        with open(path, "wb") as f:
            f.write(contents)
            f.flush()
            if self._config.fsync:
                os.fsync(f.fileno())
            check_still_linked(f.fileno(), str(path))
        result.object_bytes = len(contents)
        checksums[self.layout.object_file] = checksums_of(contents, self._config.checksum_block_bytes)

    # -- tensors ------------------------------------------------------------------------------
    def _write_tensors(self, result: SnapshotResult, checksums: dict[str, FileChecksums]) -> None:
        if not self.layout.tensor_records:
            return
        engine = create_engine(self._config.io_engine, io_threads=self._config.io_threads, queue_depth=self._config.queue_depth)
        result.engine = engine.name
        try:
            path = self.directory / self.layout.tensor_file
            target = open_for_write(str(path), self._config.direct_io)
            self._created.append(path)
            block_bytes = self._config.checksum_block_bytes
            copy_stream = self._copy_stream()
            stream = ChunkedFileStream(
                target, engine, self._pool, block_bytes if self._config.checksums else None, copy_stream
            )
            try:
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
                stream.finish_copies()
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
        checksums[self.layout.tensor_file] = FileChecksums(size, block_bytes, tuple(stream.checksums))

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
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


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
