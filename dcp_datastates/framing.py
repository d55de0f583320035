"""Stock-compatible framing of tensor records.

Stock DCP's ``FileSystemReader`` reads every tensor item with ``torch.load`` on the
byte range that ``_StorageInfo`` names. To stay readable by it we write each tensor
as exactly the bytes ``torch.save`` would produce for a contiguous tensor of that
dtype and shape -- but without going through ``torch.save`` for the data itself.

``torch.serialization.skip_data`` makes torch emit its zip container with the
storage bytes left out (and their CRC set to 0, which ``torch.load`` does not check).
We cut that container into a *prefix* (everything before the storage record's data)
and a *suffix* (everything after it); at write time the raw tensor bytes go in
between, straight from the staging buffer. The framing depends only on dtype and
shape, so it is computed at plan time, cached, and lets the planner know the exact
offset of every item before a single byte is copied.

Some tensors cannot be framed that way: torch refuses ``skip_data`` for quantized
tensors (their scale and zero points live in the pickle, not in the storage). Those
are serialized whole, exactly as stock DCP's ``FileSystemWriter`` writes every tensor
(``serialize_whole``), and stored beside the objects; stock and our readers load such a
record with ``torch.load``.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zipfile
from dataclasses import dataclass

import torch

_ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_ZIP_LOCAL_MAGIC = 0x04034B50


@dataclass(frozen=True)
class TensorFraming:
    """The torch.save container around one contiguous tensor's bytes."""

    prefix: bytes
    suffix: bytes
    data_bytes: int

    @property
    def total_bytes(self) -> int:
        return len(self.prefix) + self.data_bytes + len(self.suffix)

    @property
    def data_offset(self) -> int:
        """Where the raw tensor bytes start, relative to the start of the record."""
        return len(self.prefix)


def _storage_data_offset(container: bytes) -> tuple[int, int]:
    """Locate the (only) storage record ``<archive>/data/0`` inside a torch.save zip."""
    with zipfile.ZipFile(io.BytesIO(container)) as archive:
        records = [info for info in archive.infolist() if info.filename.endswith("/data/0")]
    if len(records) != 1:
        raise RuntimeError(f"unexpected torch.save layout: {len(records)} storage records")
    info = records[0]
    fields = _ZIP_LOCAL_HEADER.unpack_from(container, info.header_offset)
    if fields[0] != _ZIP_LOCAL_MAGIC:
        raise RuntimeError("unexpected torch.save layout: bad zip local header")
    name_len, extra_len = fields[9], fields[10]
    return info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len, info.file_size


@functools.lru_cache(maxsize=4096)
def tensor_framing(dtype: torch.dtype, shape: tuple[int, ...]) -> TensorFraming:
    """Framing of a contiguous tensor; cached because models repeat few shapes."""
    template = torch.empty(shape, dtype=dtype)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.serialization.skip_data():
        warnings.simplefilter("ignore")
        torch.save(template, buffer)
    container = buffer.getvalue()
    data_bytes = template.numel() * template.element_size()
    start, length = _storage_data_offset(container)
    if length != data_bytes:
        raise RuntimeError(f"torch.save stored {length} bytes for a {data_bytes}-byte tensor")
    return TensorFraming(container[:start], container[start + data_bytes :], data_bytes)


@functools.lru_cache(maxsize=64)
def can_frame(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` get our framing (else: ``serialize_whole``, as stock writes them).

    Decided by asking torch to frame a one-element tensor: whatever ``skip_data`` refuses
    (quantized dtypes today) is written the stock way instead of failing the save.
    """
    try:
        tensor_framing(dtype, (1,))
    except Exception:  # noqa: BLE001 - torch's refusal is the answer, whatever its type
        return False
    return True


def serialize_whole(tensor: torch.Tensor) -> bytes:
    """``torch.save`` of a tensor record, as stock ``FileSystemWriter`` writes one.

    On the host, and cloned first when it is a view of a larger storage (a slice would
    otherwise save the whole storage), as stock's loader does before ``torch.save``.
    """
    tensor = tensor.detach().cpu()
    if tensor.untyped_storage().size() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def tensor_bytes_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's logical bytes (a copy only if it is not a dense row-major block).

    Views of every kind stock DCP saves must work: strided slices and columns (stride != 1),
    expanded tensors (stride 0), and conjugate / negative-bit views, whose lazy flag would
    otherwise be lost -- ``resolve_conj``/``resolve_neg`` materialise the values they stand for.
    """
    flat = tensor.detach().resolve_conj().resolve_neg()
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=tensor.device)
    flat = flat.reshape(-1)
    if flat.stride(0) != 1:  # also a one-element view with stride != 1, which is_contiguous() accepts
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8)
