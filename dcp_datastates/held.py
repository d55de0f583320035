"""Items a rank copied at snapshot time but writes only if the global plan makes it their owner.

In a multi-rank job a plain tensor (a DDP parameter, a replicated buffer) or a Python
object may be present on several ranks, and which rank writes it is decided by DCP's
global plan -- which runs only after staging. A snapshot therefore copies such items
into host memory of their own (never the shared pool: a pool buffer held until the plan
would stall the stream of every later save) and ``write_data`` writes the ones this rank
owns into one extra data file of the save, framed exactly as stock DCP frames them and
checksummed like every other file; the others are dropped. Replicated data is written
once, as stock ``dcp.save`` writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import WriteItem

from dcp_datastates.checksums import FileChecksums, checksums_of
from dcp_datastates.framing import tensor_framing


@dataclass
class HeldItem:
    """A held tensor's bytes (a flat uint8 host tensor) or a held object's pickle."""

    item: WriteItem
    tensor: torch.Tensor | None = None
    payload: bytes | None = None


@dataclass(frozen=True)
class HeldLocation:
    offset: int
    length: int


def held_file_contents(
    items: list[HeldItem], block_bytes: int
) -> tuple[bytearray, dict[MetadataIndex, HeldLocation], FileChecksums]:
    """``items`` back to back (tensors as torch.save containers), where each went, and the block checksums.

    The writer creates the file through the checkpoint directory's descriptor (``dir_files``).
    """
    contents = bytearray()
    where: dict[MetadataIndex, HeldLocation] = {}
    for held in items:
        start = len(contents)
        if held.tensor is not None:
            data = held.item.tensor_data
            assert data is not None
            framing = tensor_framing(data.properties.dtype, tuple(data.chunk.sizes))
            contents += framing.prefix
            contents += memoryview(held.tensor.numpy())
            contents += framing.suffix
        else:
            assert held.payload is not None
            contents += held.payload
        where[held.item.index] = HeldLocation(start, len(contents) - start)
    return contents, where, checksums_of(contents, block_bytes)
