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

import os
from dataclasses import dataclass
from pathlib import Path

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


def write_held_file(
    path: Path, items: list[HeldItem], block_bytes: int, fsync: bool
) -> tuple[dict[MetadataIndex, HeldLocation], FileChecksums]:
    """Write ``items`` back to back into ``path`` (tensors as torch.save containers); return where each went."""
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
    with open(path, "wb") as f:
        f.write(contents)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return where, checksums_of(contents, block_bytes)
