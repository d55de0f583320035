"""Which rank writes replicated state: decided per item while staging, agreed in the global plan.

DCP deduplicates replicated items only in its global plan, after ``async_save`` has
staged. A rank's snapshot therefore sorts each item of its local plan into one of three:

* ``WRITE`` -- certainly this rank's to write: a one-rank save, any item of a DTensor shard
  with no ``Replicate()`` placement, or the *designated replica* of a replicated DTensor
  (mesh coordinate 0 on every dimension where it is replicated). Streamed to disk at once.
* ``SKIP`` -- a DTensor replica whose designated replica is another rank of the save: not
  copied at all (that rank writes it).
* ``HOLD`` -- anything whose owner cannot be known without talking to the other ranks: a
  plain tensor or a Python object in a multi-rank save (a DDP parameter is on every rank),
  and DTensor replicas whose designated rank is not known to be in the save's group.
  Copied to host memory now, written later only if the global plan makes this rank owner.

The coordinator then makes each item's owner a rank that wrote it, else one that holds
it (DCP's choice whenever that is valid), never one that does neither (``assign_owners``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor

from dcp_datastates.errors import DataStatesError


class Ownership(enum.Enum):
    WRITE = "write"
    HOLD = "hold"
    SKIP = "skip"


@dataclass(frozen=True)
class SaveGroup:
    """The ranks a save runs on, as far as staging can know them."""

    single: bool  # a one-process save: every item is this rank's
    #: global ranks of the save's process group; ``None`` when unknown (then nothing is skipped).
    ranks: frozenset[int] | None = None


def classify(item: WriteItem, obj: Any, group: SaveGroup) -> Ownership:
    if group.single:
        return Ownership.WRITE
    if item.type == WriteItemType.BYTE_IO or not isinstance(obj, DTensor):
        return Ownership.HOLD
    mesh = obj.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return Ownership.HOLD
    replicated = []
    for dim, placement in enumerate(obj.placements):
        if placement.is_replicate():
            replicated.append(dim)
        elif not placement.is_shard():  # Partial and anything new: the owner is not ours to guess
            return Ownership.HOLD
    if all(coordinate[dim] == 0 for dim in replicated):
        return Ownership.WRITE
    designated = list(coordinate)
    for dim in replicated:
        designated[dim] = 0
    designated_rank = int(mesh.mesh[tuple(designated)].item())
    if group.ranks is not None and designated_rank in group.ranks:
        return Ownership.SKIP
    return Ownership.HOLD


def split_items(
    items: list[WriteItem], flat_state_dict: dict[str, Any], group: SaveGroup
) -> tuple[list[WriteItem], list[WriteItem]]:
    """``(write, hold)`` items of a local plan; skipped items are in neither."""
    write: list[WriteItem] = []
    hold: list[WriteItem] = []
    for item in items:
        kind = classify(item, flat_state_dict.get(item.index.fqn), group)
        if kind is Ownership.WRITE:
            write.append(item)
        elif kind is Ownership.HOLD:
            hold.append(item)
    return write, hold


@dataclass(frozen=True)
class StagedItems:
    """A rank's report in its local plan (``storage_data`` survives DCP's dedup): what it staged."""

    written: frozenset[MetadataIndex]
    held: frozenset[MetadataIndex]


class OwnerlessItemError(DataStatesError, RuntimeError):
    """No rank of the save staged an item: the checkpoint would miss it."""


def assign_owners(plans: list[SavePlan], reports: list[StagedItems | None]) -> list[list[WriteItem]]:
    """Each rank's items after moving every item to a rank that staged it.

    ``plans`` are DCP's deduplicated plans; ``reports[r]`` is ``None`` for a rank that did
    not stage (``dcp.save``: it writes whatever it is given). The owner of an item is the
    rank that wrote it if any (its bytes are already on disk), else DCP's choice if that
    rank holds it, else the holder with the fewest bytes so far.
    """
    writer_of: dict[MetadataIndex, int] = {}
    for rank, report in enumerate(reports):
        if report is not None:
            for index in report.written:
                writer_of.setdefault(index, rank)
    assigned = [0] * len(plans)
    owned: list[list[WriteItem]] = [[] for _ in plans]
    for rank, plan in enumerate(plans):
        for item in plan.items:
            owner = writer_of.get(item.index)
            if owner is None:
                report = reports[rank]
                if report is None or item.index in report.held:
                    owner = rank
                else:
                    holders = [r for r, rep in enumerate(reports) if rep is not None and item.index in rep.held]
                    if not holders:
                        raise OwnerlessItemError(
                            f"no rank staged {item.index.fqn!r} (offset {tuple(item.index.offset or ())}): its "
                            "designated replica (mesh coordinate 0 on every Replicate() dimension) must take part "
                            "in the save; save from a process group that includes it"
                        )
                    owner = min(holders, key=lambda r: assigned[r])
            owned[owner].append(item)
            assigned[owner] += item.tensor_storage_size() or 1
    return owned
