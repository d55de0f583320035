"""Deliver: turn the bytes of landed read windows into the planner's tensors and objects.

Records arrive as pieces (a record may span windows), always in file order, so each
record is a small state machine fed piece by piece:

* **framed** tensor records (the ``torch.save`` framing we write, which stock DCP's is
  byte-identical to for contiguous tensors): the prefix is compared byte for byte with
  the framing expected for the stored dtype and shape; then the requested bytes are
  copied straight from the read buffer into the destination -- no ``torch.load``, no
  intermediate copy, a host-to-device copy from the pinned buffer, asynchronous, when
  the destination is on a GPU. Only when the destination cannot take raw bytes (another
  dtype, non-contiguous, a box that is not one run of the stored chunk) are the bytes
  gathered into one aligned temporary and converted / narrowed from there.
* anything else (a prefix that differs, a record of unknown shape, records written with
  stream transforms, objects) is gathered whole and decoded the way stock
  ``FileSystemReader`` decodes it: transforms undone through torch's own extension
  registry, then ``torch.load(weights_only=True)`` (objects: checked for safe unpickling,
  then handed to the planner).
"""

from __future__ import annotations

import ctypes
import io
from typing import cast

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension
from torch.distributed.checkpoint.planner import LoadPlanner

from dcp_datastates.errors import CheckpointIOError, CorruptCheckpointError, UnsupportedCheckpointError
from dcp_datastates.metadata_check import MAX_TRANSFORM_RATIO
from dcp_datastates.read_plan import RecordKind, RecordRead
from dcp_datastates.safe_pickle import check_object_record


#: Below this, a copy is a plain memmove (a torch op's dispatch costs more than the copy);
#: above it, torch's copy, which runs on several threads.
SMALL_COPY_BYTES = 256 * 1024


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 view (no copy)."""
    return tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8, device=tensor.device)


def _takes_raw_bytes(target: torch.Tensor, dtype: torch.dtype) -> bool:
    """Can the stored bytes be copied into ``target``'s memory as they are?"""
    return (
        target.dtype == dtype
        and target.layout == torch.strided
        and not target.is_quantized
        and target.is_contiguous()
        and not target.is_conj()
        and not target.is_neg()
        and target.device.type in ("cpu", "cuda")
    )


def undo_transforms(data: bytes, descriptors: tuple[str, ...], where: str) -> bytes:
    """Undo a stock ``FileSystemWriter(_extensions=...)`` record's stream transforms, as its reader does.

    The output is bounded as ``validate_metadata`` bounds what a transformed record may
    hold (:data:`MAX_TRANSFORM_RATIO` per stored byte): a record that inflates past it is
    damaged, and is refused before it can fill memory.
    """
    limit = len(data) * MAX_TRANSFORM_RATIO
    try:
        extensions = ExtensionRegistry().from_descriptor_list(descriptors)
    except Exception as exc:
        raise UnsupportedCheckpointError(
            f"unsupported: stream transform {list(descriptors)} of {where} ({exc}). The record was written with "
            "FileSystemWriter(_extensions=...); install what the transform needs (zstd: `pip install zstandard`) "
            "or re-save the checkpoint without extensions."
        ) from exc
    stream: io.IOBase = io.BytesIO(data)
    for extension in extensions:
        if not isinstance(extension, StreamTransformExtension):
            raise UnsupportedCheckpointError(
                f"unsupported: extension {extension.get_descriptor()!r} of {where} is not a stream transform"
            )
        stream = extension.transform_from(stream)  # type: ignore[assignment]
    pieces: list[bytes] = []
    total = 0
    try:
        while total <= limit:
            piece = stream.read(min(limit + 1 - total, 64 << 20))
            if not piece:
                return b"".join(pieces)
            pieces.append(piece)
            total += len(piece)
    except Exception as exc:
        raise CheckpointIOError(
            f"{where}: undoing stream transform {list(descriptors)} failed ({exc}); the checkpoint is damaged"
        ) from exc
    raise CorruptCheckpointError(
        f"{where}: its stream transform {list(descriptors)} decodes {len(data)} stored bytes to more than {limit} "
        f"(at most {MAX_TRANSFORM_RATIO} per stored byte); the checkpoint is damaged"
    )


class RecordDelivery:
    """One record's state while its pieces land."""

    __slots__ = ("record", "planner", "trust", "consumed", "raw", "prefix", "target", "target_bytes", "temp",
                 "cuda", "gathering", "want", "target_ptr", "device_copies")

    def __init__(self, record: RecordRead, planner: LoadPlanner, trust: bool) -> None:
        self.record = record
        self.planner = planner
        self.trust = trust
        self.consumed = 0  # record bytes seen so far
        self.raw: bytearray | None = None  # whole record, for the torch.load / object path
        self.prefix: bytearray | None = None  # a prefix split across windows
        self.target: torch.Tensor | None = None
        self.target_bytes: torch.Tensor | None = None  # raw-byte destination (direct path)
        self.temp: torch.Tensor | None = None  # aligned temporary (conversion / narrowing path)
        self.cuda = False
        self.gathering = record.kind is not RecordKind.FRAMED
        self.want = (0, 0)  # record-relative byte range of the data this delivery needs
        self.target_ptr = 0  # address of a CPU destination's first byte (direct path)
        self.device_copies = 0  # asynchronous host-to-device copies out of read buffers (direct path)

    @property
    def where(self) -> str:
        record = self.record
        return f"record of {record.item.storage_index.fqn!r} in {record.relative_path} at offset {record.offset}"

    @property
    def direct(self) -> bool:
        """Decoded from our framing (no torch.load)."""
        return not self.gathering

    # -- pieces ---------------------------------------------------------------------------------
    def feed(self, view: memoryview, data: torch.Tensor, lo: int, hi: int, address: int) -> bool:
        """Take buffer bytes ``[lo, hi)`` -- the record's next bytes; True once the record is delivered.

        ``view``, ``data`` and ``address`` are the same buffer as memoryview, uint8 tensor and address.
        """
        rel = self.consumed
        self.consumed += hi - lo
        if self.gathering:
            self._gather(view, lo, hi, rel)
        else:
            self._framed_piece(view, data, lo, hi, rel, address)
        if self.consumed < self.record.length:
            return False
        self._finish()
        return True

    def _gather(self, view: memoryview, lo: int, hi: int, rel: int) -> None:
        if self.raw is None:
            self.raw = bytearray(self.record.length)
        self.raw[rel : rel + hi - lo] = view[lo:hi]

    def _framed_piece(self, view: memoryview, data: torch.Tensor, lo: int, hi: int, rel: int, address: int) -> None:
        framing = self.record.framing
        assert framing is not None
        p = len(framing.prefix)
        if rel < p:
            take = min(p - rel, hi - lo)
            if rel == 0 and take == p:
                matches = view[lo : lo + p] == framing.prefix
                head: bytes | bytearray = b""
            else:
                self.prefix = (self.prefix or bytearray()) + view[lo : lo + take]
                if len(self.prefix) < p:
                    return
                matches = self.prefix == framing.prefix
                head = self.prefix
            if not matches:  # not the framing we expected: decode it the stock way
                self.gathering = True
                self.raw = bytearray(self.record.length)
                self.raw[: rel + take] = (head or view[lo : lo + p])[: rel + take]
                if hi - lo > take:
                    self._gather(view, lo + take, hi, rel + take)
                return
            self._start_data()
        self._copy_data(data, lo, hi, rel, address)

    def _start_data(self) -> None:
        record = self.record
        stored = record.stored
        assert stored is not None
        lengths = tuple(record.item.lengths)
        target = self.planner.resolve_tensor(record.item).detach()
        if tuple(target.size()) != lengths:
            raise CheckpointIOError(
                f"{record.item.storage_index.fqn!r}: stored slice has shape {lengths}, "
                f"destination expects {tuple(target.size())}"
            )
        self.target = target
        self.cuda = target.device.type == "cuda"
        self.want = self._wanted()
        if record.flat is not None and _takes_raw_bytes(target, stored.dtype):
            if self.cuda or self.want[1] - self.want[0] > SMALL_COPY_BYTES:
                self.target_bytes = _flat_bytes(target)
            if not self.cuda:
                self.target_ptr = target.data_ptr()
        else:
            self.temp = torch.empty(self.want[1] - self.want[0], dtype=torch.uint8)

    def _wanted(self) -> tuple[int, int]:
        """Record-relative byte range of the data this delivery needs."""
        framing = self.record.framing
        assert framing is not None
        p = len(framing.prefix)
        if self.record.flat is None:
            return p, p + framing.data_bytes
        element = self.record.stored.dtype.itemsize  # type: ignore[union-attr]
        first, count = self.record.flat
        return p + first * element, p + (first + count) * element

    def _copy_data(self, data: torch.Tensor, lo: int, hi: int, rel: int, address: int) -> None:
        want_lo, want_hi = self.want
        s, e = max(rel, want_lo), min(rel + hi - lo, want_hi)
        if s >= e:
            return
        if self.target_ptr and e - s <= SMALL_COPY_BYTES:
            ctypes.memmove(self.target_ptr + s - want_lo, address + lo + s - rel, e - s)
            return
        source = data[lo + s - rel : lo + e - rel]
        if self.target_bytes is not None:  # set for every direct target a piece this large can reach
            self.target_bytes[s - want_lo : e - want_lo].copy_(source, non_blocking=self.cuda)
            self.device_copies += self.cuda
        else:
            assert self.temp is not None
            self.temp[s - want_lo : e - want_lo].copy_(source)

    # -- end of record ----------------------------------------------------------------------------
    def _finish(self) -> None:
        record = self.record
        item = record.item
        if self.gathering:
            raw = bytes(self.raw) if self.raw is not None else b""
            self.raw = None
            if record.transforms:
                raw = undo_transforms(raw, record.transforms, self.where)
            if record.kind is RecordKind.OBJECT:
                if not self.trust:
                    check_object_record(memoryview(raw), item.storage_index.fqn, record.relative_path, record.offset)
                self.planner.load_bytes(item, io.BytesIO(raw))
                return
            self._deliver_loaded(raw)
            return
        if self.temp is not None:
            stored = record.stored
            assert stored is not None and self.target is not None
            values = self.temp.view(stored.dtype) if self.temp.numel() else torch.empty(0, dtype=stored.dtype)
            if record.flat is not None:
                values = values.reshape(tuple(item.lengths))
            else:
                values = narrow_tensor_by_index(values.reshape(stored.shape), item.storage_offsets, item.lengths)
            self.target.copy_(values)
            self.temp = None
        elif self.target is None:  # a zero-length framed record (never happens: framing has a prefix)
            return
        self.planner.commit_tensor(item, self.target)

    def _deliver_loaded(self, raw: bytes) -> None:
        record, item = self.record, self.record.item
        try:
            stored = cast(torch.Tensor, torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True))
        except Exception as exc:
            raise CheckpointIOError(
                f"{item.storage_index.fqn!r}: {self.where} ({record.length} bytes) cannot be decoded ({exc}); "
                "the checkpoint is damaged"
            ) from exc
        source = narrow_tensor_by_index(stored, item.storage_offsets, item.lengths)
        target = self.planner.resolve_tensor(item).detach()
        if target.size() != source.size():
            raise CheckpointIOError(
                f"{item.storage_index.fqn!r}: stored slice has shape {tuple(source.size())}, "
                f"destination expects {tuple(target.size())}"
            )
        target.copy_(source)
        self.planner.commit_tensor(item, target)


__all__ = ["RecordDelivery", "undo_transforms"]
