"""The planners' direct plans equal DCP's default plans, item for item, errors included."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_global_save_plan,
    create_default_local_load_plan,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata

from dcp_datastates import DataStatesLoadPlanner, DataStatesReader, DataStatesSavePlanner, DataStatesWriter
from dcp_datastates import plan_items


class Tagged(torch.Tensor):
    """A tensor subclass: never the direct path."""


def mixed_state() -> dict:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 4, generator=g)
    return {
        "model": {
            "w": torch.nn.Parameter(torch.randn(8, 3, generator=g)),
            "frozen": torch.nn.Parameter(torch.randn(5, generator=g), requires_grad=False),
            "t": base.t(),  # not contiguous
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 3),
            "half": torch.randn(7, generator=g).to(torch.bfloat16),
            "ints": torch.arange(9, dtype=torch.int64).reshape(3, 3),
            "tagged": torch.randn(4, generator=g).as_subclass(Tagged),
            "layers": [torch.randn(2, generator=g), {"bias": torch.randn(3, generator=g)}],
        },
        "step": 11,
        "name": "run",
        "extra": {"lr": 0.1},
    }


def deep_types(obj: object) -> object:
    """``obj`` with the type of every dataclass and ``torch.Size`` spelled out: equality alone misses a list offset."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj), tuple((f.name, deep_types(getattr(obj, f.name))) for f in dataclasses.fields(obj)))
    if isinstance(obj, (list, tuple)):
        return (type(obj), tuple(deep_types(v) for v in obj))
    if isinstance(obj, dict):
        return (type(obj), tuple((k, deep_types(v)) for k, v in obj.items()))
    return (type(obj), obj)


def planners(state: dict) -> tuple[DefaultSavePlanner, DataStatesSavePlanner]:
    stock, ours = DefaultSavePlanner(), DataStatesSavePlanner()
    for planner in (stock, ours):
        planner.set_up_planner(state, is_coordinator=True)
    return stock, ours


def test_local_and_global_save_plans_equal_the_default_planners() -> None:
    stock, ours = planners(mixed_state())
    stock_local, our_local = stock.create_local_plan(), ours.create_local_plan()
    assert deep_types(our_local) == deep_types(stock_local)
    assert our_local.planner_data == stock_local.planner_data and our_local.planner_data
    for ranks in (1, 2):  # one plan (no dedup needed), and two ranks saving the same replicated state
        stock_global, stock_md = stock.create_global_plan([stock_local] * ranks)
        our_global, our_md = ours.create_global_plan([our_local] * ranks)
        assert deep_types(our_global) == deep_types(stock_global)
        assert deep_types(our_md) == deep_types(stock_md)
        assert our_md.planner_data == stock_md.planner_data
    # the index hints were rewritten (0 for a whole tensor), as DCP's global plan does
    hints = {item.index.fqn: item.index.index for plan in our_global for item in plan.items}
    assert hints["model.w"] == 0 and hints["step"] is None


def test_direct_items_are_built_for_plain_tensors_only() -> None:
    state = {"a": torch.ones(3), "p": torch.nn.Parameter(torch.ones(2)), "s": torch.ones(2).as_subclass(Tagged), "o": 1}
    built: list[str] = []
    real = plan_items._tensor_write_item
    plan_items._tensor_write_item = lambda fqn, t: built.append(fqn) or real(fqn, t)
    try:
        plan = plan_items.local_save_plan(state)
    finally:
        plan_items._tensor_write_item = real
    assert built == ["a", "p"]
    assert deep_types(plan) == deep_types(create_default_local_save_plan(state, True))


def test_global_plan_of_custom_offsets_and_errors_match() -> None:
    """An item whose offset is a list (a custom planner's) and a duplicated key behave as in DCP."""
    plan = plan_items.local_save_plan({"x": torch.ones(2, 2)})
    item = plan.items[0]
    listed = dataclasses.replace(item, index=dataclasses.replace(item.index))
    object.__setattr__(listed.index, "offset", [0, 0])
    ours, _ = plan_items.global_save_plan([dataclasses.replace(plan, items=[listed])])
    stock, _ = create_default_global_save_plan([dataclasses.replace(plan, items=[listed])])
    assert deep_types(ours) == deep_types(stock) and type(ours[0].items[0].index.offset) is torch.Size
    twice = dataclasses.replace(plan, items=[item, item])
    with pytest.raises(AssertionError):
        create_default_global_save_plan([twice])
    with pytest.raises(AssertionError):
        plan_items.global_save_plan([twice])


def saved_metadata(tmp_path, state: dict) -> Metadata:
    return dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "ckpt"), no_dist=True)


def test_local_load_plan_equals_the_default_one(tmp_path) -> None:
    state = {k: v for k, v in mixed_state()["model"].items() if k not in ("layers", "tagged")} | {"step": 3}
    md = saved_metadata(tmp_path, state)
    target = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    target["tagged"] = torch.zeros(2).as_subclass(Tagged)  # not in the checkpoint
    for strict in (False,):
        assert deep_types(plan_items.local_load_plan(target, md, strict)) == deep_types(
            create_default_local_load_plan(target, md, strict))
    del target["tagged"]
    ours, stock = plan_items.local_load_plan(target, md), create_default_local_load_plan(target, md)
    assert deep_types(ours) == deep_types(stock) and len(ours.items) == len(state) - 1  # the empty tensor: no read


def test_resharded_and_odd_chunks_take_dcps_sweep_with_equal_results() -> None:
    """Two stored chunks, a chunk at an offset, and offsets of the wrong length: the same reads (or errors)."""
    props = plan_items.local_save_plan({"x": torch.ones(4)}).items[0].tensor_data.properties
    def md_of(chunks: list[ChunkStorageMetadata]) -> Metadata:
        return Metadata({"x": TensorStorageMetadata(props, torch.Size([4]), chunks)})
    layouts = [
        [ChunkStorageMetadata(torch.Size([0]), torch.Size([2])), ChunkStorageMetadata(torch.Size([2]), torch.Size([2]))],
        [ChunkStorageMetadata(torch.Size([1]), torch.Size([4]))],
        [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4]))],
    ]
    for chunks in layouts:
        target = {"x": torch.zeros(4)}
        outcomes = []
        for make in (plan_items.local_load_plan, create_default_local_load_plan):
            try:
                outcomes.append(deep_types(make(target, md_of(chunks))))
            except Exception as exc:  # noqa: BLE001 - the same error type and text is what is asserted
                outcomes.append((type(exc), str(exc)))
        assert outcomes[0] == outcomes[1], chunks
    two = plan_items.local_load_plan({"x": torch.zeros(4)}, md_of(layouts[0]))
    assert [(i.dest_offsets, i.lengths) for i in two.items] == [(torch.Size([0]), torch.Size([2])),
                                                                 (torch.Size([2]), torch.Size([2]))]


def test_load_plan_errors_match_dcps(tmp_path) -> None:
    md = saved_metadata(tmp_path, {"x": torch.ones(3), "y": torch.ones(2)})
    for target in ({"x": torch.zeros(4), "y": torch.zeros(2)}, {"x": torch.zeros(3), "z": torch.zeros(1)}):
        errors = []
        for make in (plan_items.local_load_plan, create_default_local_load_plan):
            with pytest.raises((ValueError, RuntimeError)) as caught:
                make(target, md)
            errors.append((caught.type, str(caught.value)))
        assert errors[0] == errors[1]


def test_planners_round_trip_exact_values_and_a_partial_load(tmp_path) -> None:
    state = {"model": {f"b{i}": torch.full((16,), float(i)) for i in range(300)}, "step": 7}
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c"), planner=DataStatesSavePlanner(), no_dist=True)
    target = {"model": {k: torch.zeros(16) for k in state["model"]}, "step": 0}
    dcp.load(target, storage_reader=DataStatesReader(tmp_path / "c"), planner=DataStatesLoadPlanner(), no_dist=True)
    assert target["step"] == 7 and all(torch.equal(target["model"][k], v) for k, v in state["model"].items())
    part = {"model": {"b5": torch.zeros(16)}}  # checkpoint keys missing from the state dict: DCP's own check path
    dcp.load(part, storage_reader=DataStatesReader(tmp_path / "c"), planner=DataStatesLoadPlanner(), no_dist=True)
    assert torch.equal(part["model"]["b5"], torch.full((16,), 5.0))
    stock = {"model": {k: torch.zeros(16) for k in state["model"]}, "step": 0}
    dcp.load(stock, storage_reader=dcp.FileSystemReader(tmp_path / "c"), planner=DefaultLoadPlanner(), no_dist=True)
    assert all(torch.equal(stock["model"][k], v) for k, v in state["model"].items())
