"""Property-based round trips of what users' state dicts hold, through both engines.

Generated: every dtype; views with a storage offset, strides, transposes, stride-0 expansions,
conjugate and negative bits; tensors from empty to several chunks long (so records cross
buffer boundaries); dotted and non-ASCII keys; ``None``, bytes and nested containers among
the objects. ``COUNTS`` records what was really generated -- read from the built tensors and
objects, not from the strategy's choices -- and the test asserts that every kind showed up.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import assert_state_equal, small_config, zeros_like_state
from dcp_datastates import DataStatesReader, DataStatesWriter

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]
VIEWS = ["plain", "offset", "strided", "transposed", "expanded", "conj", "neg"]
SMALL_SHAPES = st.lists(st.integers(min_value=0, max_value=9), min_size=0, max_size=3).map(tuple)
# ("span", chunks, delta): a 1-D tensor of about ``chunks`` pool buffers plus ``delta`` bytes.
SPANS = st.tuples(st.just("span"), st.integers(1, 3), st.integers(-40, 40))
KEYS = st.text(alphabet="abc_.éßκ日本", min_size=1, max_size=6)
TENSORS = st.tuples(st.sampled_from(DTYPES), st.one_of(SMALL_SHAPES, SPANS), st.integers(0, 2**31 - 1),
                    st.sampled_from(VIEWS)).map(lambda t: ("tensor", t))
SCALARS = st.one_of(st.none(), st.integers(-(2**62), 2**62), st.text(max_size=12),
                    st.frozensets(st.integers(-5, 5), max_size=3), st.floats(allow_nan=False),
                    st.binary(max_size=24))
# DCP flattens dicts, and lists that hold dicts; these containers reach the writer as one object each.
CONTAINERS = st.one_of(
    st.lists(st.one_of(SCALARS, st.lists(SCALARS, max_size=3)), max_size=4),
    st.tuples(SCALARS, st.dictionaries(st.text(max_size=4), st.lists(SCALARS, max_size=3), max_size=3)),
)
OBJECTS = st.one_of(SCALARS, CONTAINERS).map(lambda v: ("object", v))
LEAVES = st.one_of(TENSORS, TENSORS, OBJECTS)  # two tensors to an object: tensors have more kinds to cover
STATES = st.recursive(st.dictionaries(KEYS, LEAVES, min_size=2, max_size=6),
                      lambda children: st.dictionaries(KEYS, children, min_size=1, max_size=3), max_leaves=16)

# Hypothesis's draws vary a lot from run to run (it may leave whole branches out of a run), so
# every example also carries one tensor of each view kind and one object of each kind, of random
# dtype, shape and content: the counters below then cannot fall short by chance.
NESTED = st.tuples(SCALARS, st.dictionaries(st.text(max_size=4), st.lists(SCALARS, max_size=3), min_size=1, max_size=3))
EVERY_KIND = st.fixed_dictionaries(
    {f"view.{view}": st.tuples(st.sampled_from(DTYPES), st.one_of(SMALL_SHAPES, SPANS), st.integers(0, 2**31 - 1),
                               st.just(view)).map(lambda t: ("tensor", t)) for view in VIEWS}
    | {"none": st.just(("object", None)), "bytes": st.binary(max_size=24).map(lambda v: ("object", v)),
       "nested": NESTED.map(lambda v: ("object", v))}
)
ENGINES = st.booleans().map(lambda uring: "io_uring" if uring else "threads")

COUNTS: Counter[str] = Counter()
BLANK = ("never generated", object.__name__, 0x5EED)  # what a destination's objects hold before the load


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(shape, generator=g, dtype=torch.complex128 if dtype.is_complex else torch.float64) * 100).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def build_tensor(dtype: torch.dtype, shape, seed: int, view: str, chunk_bytes: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if shape and shape[0] == "span":
        _, chunks, delta = shape
        shape = (max(1, (chunks * chunk_bytes + delta) // dtype.itemsize),)
    numel = 1
    for n in shape:
        numel *= n
    if view == "offset":  # a slice that starts inside its storage
        return random_tensor(dtype, (numel + 3,), g)[3:].view(shape)
    # every other element of the last dimension
    if view == "strided" and shape:
        return random_tensor(dtype, (*shape[:-1], 2 * shape[-1]), g)[..., ::2]
    if view == "transposed" and len(shape) >= 2:
        return random_tensor(dtype, shape[::-1], g).transpose(0, -1)
    if view == "expanded":  # three rows that are one row: stride 0
        return random_tensor(dtype, shape, g).unsqueeze(0).expand(3, *shape)
    if view == "conj":
        return random_tensor(torch.complex64, shape, g).conj()
    if view == "neg":  # imag of a conjugate: negative-bit and strided
        return random_tensor(torch.complex64, shape, g).conj().imag
    return random_tensor(dtype, shape, g)


def build(spec: dict, chunk_bytes: int) -> dict:
    out = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            out[key] = build(value, chunk_bytes)
        elif value[0] == "tensor":
            out[key] = build_tensor(*value[1], chunk_bytes)
        else:
            out[key] = value[1]
    return out


def flat_keys(state: dict, prefix: str = "") -> list[str]:
    """The fully qualified names DCP will flatten the state to."""
    keys = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        keys += flat_keys(value, name + ".") if isinstance(value, dict) else [name]
    return keys


def count_kinds(state: dict, chunk_bytes: int) -> None:
    """What the example really holds, read from the values themselves."""
    for key, value in state.items():
        COUNTS["dotted key"] += "." in key
        COUNTS["non-ASCII key"] += not key.isascii()
        if isinstance(value, dict):
            count_kinds(value, chunk_bytes)
        elif isinstance(value, torch.Tensor):
            COUNTS["storage offset"] += value.storage_offset() > 0
            COUNTS["non-contiguous"] += not value.is_contiguous()
            COUNTS["stride 0"] += value.numel() > 1 and 0 in value.stride()
            COUNTS["conjugate bit"] += value.is_conj()
            COUNTS["negative bit"] += value.is_neg()
            COUNTS["empty tensor"] += value.numel() == 0
            COUNTS["crosses a chunk boundary"] += value.numel() * value.element_size() > chunk_bytes
        else:
            COUNTS["None object"] += value is None
            COUNTS["bytes object"] += isinstance(value, bytes)
            COUNTS["nested container"] += isinstance(value, (list, tuple)) and any(isinstance(v, (list, dict)) for v in value)


@given(spec=STATES, every_kind=EVERY_KIND, engine=ENGINES, chunk_pages=st.integers(1, 4))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def round_trip(spec, every_kind, engine, chunk_pages):
    chunk_bytes = 4096 * chunk_pages
    state = build(spec, chunk_bytes) | {"every.kind": build(every_kind, chunk_bytes)}  # KEYS cannot spell "every"
    names = flat_keys(state)
    assume(len(set(names)) == len(names))  # {"a.b": x} beside {"a": {"b": y}} is one DCP key, not two
    config = small_config(engine, chunk_bytes=chunk_bytes, host_pool_bytes=chunk_bytes * 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c"
        dcp.save(state, storage_writer=DataStatesWriter(path, config), no_dist=True)
        for reader in (DataStatesReader(path), dcp.FileSystemReader(path)):
            out = zeros_like_state(state, blank=BLANK)
            dcp.load(out, storage_reader=reader, no_dist=True)
            assert_state_equal(out, state)
    COUNTS["examples"] += 1
    COUNTS[f"engine {engine}"] += 1
    count_kinds(state, chunk_bytes)


def test_random_state_dicts_round_trip_exactly():
    COUNTS.clear()
    round_trip()
    kinds = ["engine threads", "engine io_uring", "storage offset", "non-contiguous", "stride 0", "conjugate bit",
             "negative bit", "empty tensor", "crosses a chunk boundary", "dotted key", "non-ASCII key",
             "None object", "bytes object", "nested container"]
    print(f"generated: {dict(COUNTS)}")
    assert COUNTS["examples"] >= 40, COUNTS
    missing = {kind: COUNTS[kind] for kind in kinds if COUNTS[kind] < 5}
    assert not missing, f"generated too few of {missing}; all counts: {dict(COUNTS)}"


# Found by the property test: torch's weights-only unpickler refuses GLOBAL builtins.bytes (how
# pickle writes b"") and frozenset, so safe loading rejected objects that saved fine.
@pytest.mark.parametrize("value", [b"", frozenset({1})], ids=["empty bytes", "frozenset"])
def test_empty_bytes_and_frozenset_objects_load_safely(tmp_path, value):
    dcp.save({"w": torch.ones(2), "obj": value}, storage_writer=DataStatesWriter(tmp_path / "c", small_config("threads")), no_dist=True)
    out = {"w": torch.zeros(2), "obj": BLANK}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert out["obj"] == value and torch.equal(out["w"], torch.ones(2))


# Found by the property test: a one-element view with stride != 1 is "contiguous" yet reshape(-1)
# kept its stride, so framing's .view(torch.uint8) raised.
@pytest.mark.parametrize("make", [lambda: torch.arange(2.0)[::2], lambda: torch.tensor([1 + 2j]).conj().imag],
                         ids=["x[::2] of two elements", "negative-bit imag of one complex"])
def test_one_element_strided_view_saves(tmp_path, make):
    t = make()  # shape (1,), stride (2,)
    expected = t.resolve_neg().clone()
    dcp.save({"t": t}, storage_writer=DataStatesWriter(tmp_path / "c", small_config("threads")), no_dist=True)
    out = {"t": torch.zeros(1)}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert torch.equal(out["t"], expected)
