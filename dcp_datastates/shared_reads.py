"""Read replicated state once per job: which rank reads each record that several ranks need.

When N ranks load the same replicated bytes (parameters every rank holds in full, an
optimizer state saved once), each reading them costs N times the storage bandwidth
(torchtitan RFC #4035, "Striped I/O + Collective Broadcast"). The coordinator sees every
rank's load plan, so it can find the records several ranks need and give each one owner:
the shared records, in file order, are cut into one stripe per rank of about equal bytes;
a stripe's rank reads it (or, for a record it does not need, the needing rank with the
fewest bytes so far), and broadcasts it in batches of at most ``batch_bytes`` to the others.

This module only decides; ``reader.py`` reads and exchanges. Every rank gets the same
``SharedReads`` (in the same order), which is what keeps their broadcasts matched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan

#: Largest broadcast: bounds the host memory the exchange needs on every rank.
BATCH_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class LocalPlanInfo:
    """What a rank tells the coordinator with its local plan."""

    host: str


@dataclass(frozen=True)
class SharedBatch:
    owner: int
    records: tuple[tuple[MetadataIndex, int, int], ...]  # (storage index, position in the batch, length)

    @property
    def nbytes(self) -> int:
        return sum(length for _, _, length in self.records)


@dataclass(frozen=True)
class SharedReads:
    world_size: int
    batches: tuple[SharedBatch, ...]

    def indexes(self) -> set[MetadataIndex]:
        return {index for batch in self.batches for index, _, _ in batch.records}


def assign_shared_reads(
    plans: list[LoadPlan], storage_data: Mapping[MetadataIndex, _StorageInfo], batch_bytes: int = BATCH_BYTES
) -> SharedReads | None:
    """Owners and broadcast batches for the records more than one rank needs; None if there are none."""
    needed_by: dict[MetadataIndex, set[int]] = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            needed_by.setdefault(item.storage_index, set()).add(rank)
    shared = [index for index, ranks in needed_by.items() if len(ranks) > 1]
    if not shared:
        return None
    shared.sort(key=lambda index: (storage_data[index].relative_path, storage_data[index].offset))
    total = sum(storage_data[index].length for index in shared)
    stripe = -(-total // len(plans))
    owned = [0] * len(plans)
    owners: list[int] = []
    running = 0
    for index in shared:
        length = storage_data[index].length
        rank = min((running + length // 2) // max(1, stripe), len(plans) - 1)  # where its middle falls
        if rank not in needed_by[index]:
            rank = min(needed_by[index], key=lambda r: owned[r])
        owners.append(rank)
        owned[rank] += length
        running += length
    batches: list[SharedBatch] = []
    current: list[tuple[MetadataIndex, int, int]] = []
    current_owner, size = -1, 0
    for index, owner in zip(shared, owners):
        length = storage_data[index].length
        if current and (owner != current_owner or size + length > batch_bytes):
            batches.append(SharedBatch(current_owner, tuple(current)))
            current, size = [], 0
        current.append((index, size, length))
        current_owner = owner
        size += length
    if current:
        batches.append(SharedBatch(current_owner, tuple(current)))
    return SharedReads(len(plans), tuple(batches))
