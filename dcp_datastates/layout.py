"""Where every byte of a rank's checkpoint goes (the plan step's output).

Tensor records have a size known from dtype and shape alone (see ``framing``), so
the whole data file is laid out before any copy starts: every item's offset is
fixed, write results are known up front, and the bytes can be streamed in one pass.
Tensors our framing cannot express (quantized, see ``framing.can_frame``) are written
whole with ``torch.save`` -- stock DCP's way -- in the object file, beside the objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.checkpoint.planner import WriteItem

from dcp_datastates.framing import TensorFraming, can_frame, tensor_framing
from dcp_datastates.state_providers import ProviderGroups

DATA_SUFFIX = ".distcp"


@dataclass(frozen=True)
class TensorRecord:
    item: WriteItem
    offset: int  # where the torch.save container starts in the file
    framing: TensorFraming


@dataclass(frozen=True)
class RankLayout:
    file_prefix: str  # "__<rank>_<save tag>_": unique to one save, shared by all its files
    tensor_file: str
    tensor_records: list[TensorRecord]
    tensor_file_bytes: int
    object_file: str
    #: records serialized whole (``torch.save``) into ``object_file``: objects, and tensors ``can_frame`` refuses
    object_items: list[WriteItem]


def build_rank_layout(groups: ProviderGroups, file_prefix: str) -> RankLayout:
    """Pack every tensor record back to back in provider order; objects get their own file."""
    records: list[TensorRecord] = []
    whole: list[WriteItem] = []  # tensors stock-serialized beside the objects
    offset = 0
    for claimed in groups.tensors():
        data = claimed.item.tensor_data
        assert data is not None, f"tensor item {claimed.item.index} without tensor_data"
        if not can_frame(data.properties.dtype):
            whole.append(claimed.item)
            continue
        # data.size is the global tensor's; this rank writes the chunk (its shard).
        framing = tensor_framing(data.properties.dtype, tuple(data.chunk.sizes))
        records.append(TensorRecord(claimed.item, offset, framing))
        offset += framing.total_bytes
    return RankLayout(
        file_prefix=file_prefix,
        tensor_file=f"{file_prefix}0{DATA_SUFFIX}",
        tensor_records=records,
        tensor_file_bytes=offset,
        object_file=f"{file_prefix}1{DATA_SUFFIX}",
        object_items=[c.item for c in groups.objects()] + whole,
    )


def with_prefix(layout: RankLayout, file_prefix: str) -> RankLayout:
    """The same layout under another save's file prefix (offsets depend on the structure alone)."""
    return RankLayout(
        file_prefix=file_prefix,
        tensor_file=f"{file_prefix}0{DATA_SUFFIX}",
        tensor_records=layout.tensor_records,
        tensor_file_bytes=layout.tensor_file_bytes,
        object_file=f"{file_prefix}1{DATA_SUFFIX}",
        object_items=layout.object_items,
    )
