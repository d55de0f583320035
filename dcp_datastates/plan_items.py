"""DCP's save and load plans, built at a few microseconds per plain tensor, equal to DCP's own.

DCP's default planners build each ``WriteItem`` / ``ReadItem`` through frozen-dataclass
constructors, ``dataclasses.replace`` and a resharding sweep, ~35 us (save) and ~35 us (load)
per tensor: with 50,000 small tensors (norms, biases, per-expert state) planning costs more
than writing the bytes. A plain ``torch.Tensor`` (or ``nn.Parameter``) saved whole has one
chunk at offset zero, so its items follow from its shape: these functions build them directly
and hand everything else (DTensor, ShardedTensor, tensor subclasses, resharded or empty
tensors) to DCP's own helpers. The plans compare equal (``==``) to what
``create_default_local_save_plan``, ``create_default_global_save_plan`` and
``create_default_local_load_plan`` return, including their errors (a test holds them to it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import _create_read_items, _create_write_items
from torch.distributed.tensor import DTensor

#: Exactly these types take the direct path (a subclass may plan itself: ``__create_write_items__``).
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_ZEROS: dict[int, torch.Size] = {}


def _new(cls: type, **fields: Any) -> Any:
    """An instance of dataclass ``cls`` with ``fields``, without its (frozen) ``__init__``.

    Only for DCP's plain-field dataclasses here, none of which has a ``__post_init__``.
    """
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


def _zeros(ndim: int) -> torch.Size:
    zeros = _ZEROS.get(ndim)
    if zeros is None:
        zeros = _ZEROS[ndim] = torch.Size([0] * ndim)
    return zeros


def _index(fqn: str, offset: Any, hint: int | None) -> MetadataIndex:
    """``MetadataIndex(fqn, offset, hint)``: its ``__init__`` makes the offset a ``torch.Size``."""
    if offset is not None and type(offset) is not torch.Size:
        offset = torch.Size(offset)
    return _new(MetadataIndex, fqn=fqn, offset=offset, index=hint)


def _tensor_write_item(fqn: str, tensor: torch.Tensor) -> WriteItem:
    """``_create_write_item_for_tensor(fqn, tensor)``, directly."""
    size = tensor.size()
    zeros = _zeros(len(size))
    properties = _new(TensorProperties, dtype=tensor.dtype, layout=tensor.layout, requires_grad=tensor.requires_grad,
                      memory_format=torch.contiguous_format, pin_memory=tensor.is_pinned())
    data = _new(TensorWriteData, chunk=_new(ChunkStorageMetadata, offsets=zeros, sizes=size),
                properties=properties, size=size)
    return _new(WriteItem, index=_index(fqn, zeros, None), type=WriteItemType.TENSOR, bytes_io_data=None,
                tensor_data=data)


def local_save_plan(state_dict: dict[str, Any]) -> SavePlan:
    """``create_default_local_save_plan(state_dict, is_coordinator)`` (which ignores the coordinator flag)."""
    items: list[WriteItem] = []
    for fqn, obj in state_dict.items():
        if type(obj) in _PLAIN:
            items.append(_tensor_write_item(fqn, obj))
        elif isinstance(obj, DTensor):
            if obj.device_mesh.get_coordinate() is not None:
                items += _create_write_items(fqn, obj)
        else:
            items += _create_write_items(fqn, obj)
    return SavePlan(items)


def global_save_plan(all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
    """``create_default_global_save_plan(all_plans)``: metadata of every item, index hints rewritten."""
    md: dict[str, Any] = {}
    new_plans = []
    for plan in all_plans:
        new_items = []
        for item in plan.items:
            index = item.index
            if item.type != WriteItemType.SHARD and index.fqn in md:
                raise AssertionError("item.index.fqn not in md")
            if item.type == WriteItemType.BYTE_IO:
                md[index.fqn] = BytesStorageMetadata()
                new_items.append(item)
                continue
            data = item.tensor_data
            if data is None:
                raise AssertionError("item.tensor_data is not None")
            tensor_md = md.get(index.fqn)
            if tensor_md is None:
                tensor_md = md[index.fqn] = TensorStorageMetadata(properties=data.properties, size=data.size, chunks=[])
            if type(item) is WriteItem and type(index) is MetadataIndex:
                renamed = object.__new__(WriteItem)
                renamed.__dict__.update(item.__dict__)
                renamed.__dict__["index"] = _index(index.fqn, index.offset, len(tensor_md.chunks))
            else:  # a custom planner's own item or index type: DCP's way, which keeps the type
                renamed = dataclasses.replace(item, index=dataclasses.replace(index, index=len(tensor_md.chunks)))
            new_items.append(renamed)
            if data.chunk is None:
                raise AssertionError(f"Cannot create MD for tensor without bounds. FQN: {index.fqn}")
            tensor_md.chunks.append(data.chunk)
        new_plans.append(dataclasses.replace(plan, items=new_items))
    return new_plans, Metadata(md)


def _whole_tensor_read(fqn: str, size: torch.Size, stored: ChunkStorageMetadata) -> ReadItem:
    zeros = _zeros(len(size))
    return _new(ReadItem, type=LoadItemType.TENSOR, dest_index=_index(fqn, zeros, 0), dest_offsets=zeros,
                storage_index=_index(fqn, stored.offsets, 0), storage_offsets=zeros, lengths=size)


def local_load_plan(state_dict: dict[str, Any], metadata: Metadata, strict: bool = True) -> LoadPlan:
    """``create_default_local_load_plan(state_dict, metadata, strict)``.

    The direct path takes a plain tensor stored whole in one chunk at offset zero, with no
    empty dimension (DCP plans no read for an empty tensor); anything else is DCP's sweep.
    """
    stored = metadata.state_dict_metadata
    requests: list[ReadItem] = []
    for fqn, obj in state_dict.items():
        md = stored.get(fqn)
        if md is None and fqn not in stored:
            if strict:
                raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")
            continue
        if type(obj) in _PLAIN and type(md) is TensorStorageMetadata:
            size = obj.size()
            if md.size != size:
                raise ValueError(f"Size mismatch between saved {md.size} and current: {size} for {fqn}")
            chunks = md.chunks
            chunk = chunks[0] if len(chunks) == 1 else None
            if type(chunk) is ChunkStorageMetadata and chunk.sizes == size and not any(chunk.offsets) and all(size):
                requests.append(_whole_tensor_read(fqn, size, chunk))
                continue
            requests += _create_read_items(fqn, md, obj)
            continue
        if isinstance(md, TensorStorageMetadata) and getattr(obj, "size", None) is not None and md.size != obj.size():
            raise ValueError(f"Size mismatch between saved {md.size} and current: {obj.size()} for {fqn}")
        if isinstance(obj, DTensor):
            if obj.device_mesh.get_coordinate() is not None:
                requests += _create_read_items(fqn, md, obj)
        else:
            requests += _create_read_items(fqn, md, obj)
    return LoadPlan(requests)
