"""State Providers: the planner's knowledge of the "3D heterogeneity" of training state.

Training state differs in *where* it lives (accelerator or host), *how* it is split
(one logical tensor as many DTensor shards) and *what* it is (tensors or Python
objects). Each provider claims one kind of write item and decides its order; the
layout then packs every tensor a rank owns into one contiguous data file, so the
fragments become a few large sequential writes, while objects go to a side file that
is serialized on its own thread. Stock DCP can still read every item: each tensor
record is a complete ``torch.save`` container at an offset recorded in the metadata.

Order matters: device tensors come first so their device-to-host copies start as
early as possible; shards of one logical tensor are placed next to each other in
offset order, so a resharding reader reads neighbouring bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from torch.distributed.tensor import DTensor


@dataclass
class ClaimedItem:
    item: WriteItem
    obj: Any  # the state-dict value behind the item (DTensor, tensor, or Python object)


class StateProvider(ABC):
    """Claims the write items of one kind of state and orders them for writing."""

    name: str = "state"

    @abstractmethod
    def claims(self, item: WriteItem, obj: Any) -> bool: ...

    def order(self, claimed: list[ClaimedItem]) -> list[ClaimedItem]:
        return claimed


class ObjectStateProvider(StateProvider):
    """Non-tensor Python state (step counters, scheduler dicts, strings): pickled off the hot path."""

    name = "objects"

    def claims(self, item: WriteItem, obj: Any) -> bool:
        return item.type == WriteItemType.BYTE_IO


class ShardedTensorProvider(StateProvider):
    """DTensor local shards: fragments of one logical tensor, kept together in offset order."""

    name = "dtensor_shards"

    def claims(self, item: WriteItem, obj: Any) -> bool:
        return isinstance(obj, DTensor)

    def order(self, claimed: list[ClaimedItem]) -> list[ClaimedItem]:
        def key(c: ClaimedItem) -> tuple[bool, str, tuple[int, ...]]:
            offsets = tuple(c.item.index.offset or ())
            return (_is_host(c.obj), c.item.index.fqn, offsets)

        return sorted(claimed, key=key)


class DeviceTensorProvider(StateProvider):
    """Plain tensors on an accelerator: first in the file, so their D2H copies start first."""

    name = "device_tensors"

    def claims(self, item: WriteItem, obj: Any) -> bool:
        return isinstance(obj, torch.Tensor) and not _is_host(obj)


class HostTensorProvider(StateProvider):
    """Plain tensors already in host memory: copied straight into the staging buffers."""

    name = "host_tensors"

    def claims(self, item: WriteItem, obj: Any) -> bool:
        return item.type != WriteItemType.BYTE_IO


def _is_host(obj: Any) -> bool:
    return not isinstance(obj, torch.Tensor) or obj.device.type == "cpu"


def default_providers() -> list[StateProvider]:
    """Order of this list = order of claiming = order in the data file."""
    return [ObjectStateProvider(), ShardedTensorProvider(), DeviceTensorProvider(), HostTensorProvider()]


@dataclass
class ProviderGroups:
    """Each provider's claimed items, in the provider's order."""

    groups: dict[str, list[ClaimedItem]] = field(default_factory=dict)

    def tensors(self) -> list[ClaimedItem]:
        return [c for name, items in self.groups.items() if name != ObjectStateProvider.name for c in items]

    def objects(self) -> list[ClaimedItem]:
        return self.groups.get(ObjectStateProvider.name, [])


def assign_to_providers(
    items: list[WriteItem], state_dict: dict[str, Any], providers: list[StateProvider]
) -> ProviderGroups:
    """Give each item to the first provider that claims it."""
    claimed: dict[str, list[ClaimedItem]] = {p.name: [] for p in providers}
    for item in items:
        obj = state_dict.get(item.index.fqn)
        for provider in providers:
            if provider.claims(item, obj):
                claimed[provider.name].append(ClaimedItem(item, obj))
                break
        else:
            raise ValueError(f"no state provider claims {item.index.fqn!r} ({item.type.name})")
    return ProviderGroups({p.name: p.order(claimed[p.name]) for p in providers})
