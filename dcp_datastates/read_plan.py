"""The read plan: which byte ranges of which files to read, in what order, and what each record is.

DCP's planner has already decided which stored chunk feeds which local tensor (resharding
included). Here we decide *how* to get the bytes: every record a rank needs is located in
its file, records are sorted by offset, their ranges are widened to the checksum block
(so every block read can be verified) and the O_DIRECT alignment, neighbouring ranges are
merged (thousands of small records become a few large reads), and merged ranges are cut
into windows of at most one read buffer. Windows are read in that order, so each record's
bytes arrive in order, and a record may span several windows (a 1 GiB matrix streams
through 16 MiB buffers).

Each record also gets its *kind*: a tensor record whose length matches the framing we
write (``framing.tensor_framing`` of the stored dtype and shape) is decoded from that
framing -- the prefix bytes are compared on arrival and the data copied straight to its
destination; anything else (objects, records written with stream transforms, records of
unknown shape) is decoded the way stock DCP does.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from dcp_datastates.framing import TensorFraming, can_frame, tensor_framing

#: O_DIRECT alignment of offsets and lengths.
DIRECT_IO_ALIGNMENT = 4096
#: Ranges closer than this are read as one (reading a small gap costs less than another request).
MERGE_GAP_BYTES = 1024**2


class RecordKind(Enum):
    FRAMED = "framed"  # our framing (or stock's, byte-identical): decoded in place
    TENSOR = "tensor"  # a tensor record decoded with torch.load (stock DCP's way)
    OBJECT = "object"  # a BYTE_IO record


@dataclass(frozen=True)
class StoredTensor:
    """Dtype and shape of one stored chunk (from the checkpoint's metadata)."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class RecordRead:
    """One ReadItem: where its record is, and how it will be decoded."""

    item: ReadItem
    relative_path: str
    offset: int
    length: int
    kind: RecordKind
    transforms: tuple[str, ...] = ()
    framing: TensorFraming | None = None
    stored: StoredTensor | None = None
    #: for FRAMED: the requested box as a contiguous element range (start, count) of the stored
    #: chunk, or None when the box is not contiguous (then the whole chunk is decoded and narrowed)
    flat: tuple[int, int] | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class Window:
    """One read: ``[start, start + read_bytes)`` of file ``file_index``; valid up to ``end``."""

    file_index: int
    start: int
    end: int  # min(aligned end, file size): bytes past it are not part of the file
    read_bytes: int  # aligned length asked of the engine
    records: list[RecordRead] = field(default_factory=list)


@dataclass
class FileRead:
    relative_path: str
    size: int
    align: int
    records: list[RecordRead]


@dataclass
class ReadPlan:
    files: list[FileRead]
    windows: list[Window]
    buffer_bytes: int

    @property
    def bytes_to_read(self) -> int:
        return sum(w.end - w.start for w in self.windows)


class StoredTensors:
    """Dtype and shape of every stored tensor chunk, looked up by the index ``storage_data`` uses.

    Built lazily per key: a checkpoint of 50,000 tensors must not pay for building 50,000
    index objects before the first read.
    """

    def __init__(self, metadata: Metadata | None) -> None:
        self._md = metadata.state_dict_metadata if metadata is not None else {}
        self._multi: dict[str, dict[tuple[int, ...], tuple[int, ...]]] = {}

    def get(self, index: MetadataIndex) -> StoredTensor | None:
        md = self._md.get(index.fqn)
        if not isinstance(md, TensorStorageMetadata):
            return None
        chunks = md.chunks
        if len(chunks) == 1:
            chunk = chunks[0]
            if tuple(chunk.offsets) != tuple(index.offset):
                return None
            return StoredTensor(md.properties.dtype, tuple(chunk.sizes))
        by_offset = self._multi.get(index.fqn)
        if by_offset is None:
            by_offset = self._multi[index.fqn] = {tuple(c.offsets): tuple(c.sizes) for c in chunks}
        sizes = by_offset.get(tuple(index.offset))
        return None if sizes is None else StoredTensor(md.properties.dtype, sizes)


def stored_tensors(metadata: Metadata | None) -> StoredTensors:
    return StoredTensors(metadata)


def contiguous_range(shape: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...]) -> tuple[int, int] | None:
    """The box ``offsets/lengths`` of a row-major ``shape`` as (first element, count), if it is one run.

    It is when, ``k`` being the last dimension that is not whole, every dimension before ``k``
    has length 1: a whole tensor, a block of rows (``Shard(0)``), one row's slice.
    """
    if len(shape) != len(offsets) or len(shape) != len(lengths):
        return None
    if lengths == shape:  # the whole chunk (the common case: no resharding)
        return (0, math.prod(shape))
    count = math.prod(lengths)
    if count == 0:
        return (0, 0)
    partial = [d for d in range(len(shape)) if lengths[d] != shape[d]]
    if any(lengths[d] != 1 for d in range(partial[-1])):  # partial is not empty: lengths != shape
        return None
    start, stride = 0, 1
    for d in reversed(range(len(shape))):
        start += offsets[d] * stride
        stride *= shape[d]
    return (start, count)


def classify(item: ReadItem, info: _StorageInfo, stored: StoredTensor | None) -> RecordRead:
    transforms = tuple(info.transform_descriptors or ())
    record = RecordRead(item, info.relative_path, info.offset, info.length, RecordKind.TENSOR, transforms)
    if item.type == LoadItemType.BYTE_IO:
        record.kind = RecordKind.OBJECT
        return record
    if transforms or stored is None or any(s < 0 for s in stored.shape) or not can_frame(stored.dtype):
        return record  # can_frame: a dtype torch.save cannot frame on its own (quantized): torch.load decides
    try:
        framing = tensor_framing(stored.dtype, stored.shape)
    except Exception:  # noqa: BLE001 - a shape torch cannot frame: let torch.load decide
        return record
    if framing.total_bytes != info.length:
        return record
    record.kind = RecordKind.FRAMED
    record.framing = framing
    record.stored = stored
    record.flat = contiguous_range(stored.shape, tuple(item.storage_offsets), tuple(item.lengths))
    return record


def plan_reads(
    items: list[ReadItem],
    storage_data: Mapping[MetadataIndex, _StorageInfo],
    stored: StoredTensors,
    file_sizes: Mapping[str, int],
    block_bytes: Mapping[str, int],
    buffer_bytes: int,
) -> ReadPlan:
    """Group, sort, merge and window every record of ``items``.

    ``block_bytes`` is each file's checksum block (absent: unverified, 4096); windows start on
    multiples of it, so every block read is whole and can be checked. ``buffer_bytes`` is
    rounded up to a multiple of every file's alignment.
    """
    by_file: dict[str, list[RecordRead]] = {}
    for item in items:
        info = storage_data[item.storage_index]
        by_file.setdefault(info.relative_path, []).append(classify(item, info, stored.get(item.storage_index)))
    files: list[FileRead] = []
    for relative_path in sorted(by_file):
        records = by_file[relative_path]
        records.sort(key=lambda r: r.offset)
        block = block_bytes.get(relative_path, DIRECT_IO_ALIGNMENT)
        if block <= 0:
            raise ValueError(f"the checksum file gives {relative_path} a block size of {block} bytes; it is damaged")
        align = block * DIRECT_IO_ALIGNMENT // math.gcd(block, DIRECT_IO_ALIGNMENT)
        files.append(FileRead(relative_path, file_sizes[relative_path], align, records))
    for f in files:
        buffer_bytes = -(-buffer_bytes // f.align) * f.align

    windows: list[Window] = []
    for index, f in enumerate(files):
        spans: list[list[int]] = []
        for r in f.records:
            start = r.offset // f.align * f.align
            end = -(-r.end // f.align) * f.align
            if spans and start <= spans[-1][1] + MERGE_GAP_BYTES:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        first = len(windows)
        for start, end in spans:
            for w in range(start, end, buffer_bytes):
                read = min(buffer_bytes, end - w)
                windows.append(Window(index, w, min(w + read, f.size), read))
        starts = [w.start for w in windows[first:]]
        for r in f.records:
            i = first + max(0, bisect.bisect_right(starts, r.offset) - 1)
            while i < len(windows) and windows[i].start < max(r.end, r.offset + 1):
                if windows[i].start + windows[i].read_bytes > r.offset:
                    windows[i].records.append(r)
                i += 1
    return ReadPlan(files, windows, buffer_bytes)
