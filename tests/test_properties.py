"""Property-based round trips: random nested state dicts, every dtype, odd shapes, both engines."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_state_equal, small_config, zeros_like_state
from dcp_datastates import DataStatesReader, DataStatesWriter

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool, torch.complex64]
SHAPES = st.lists(st.integers(min_value=0, max_value=9), min_size=0, max_size=3).map(tuple)
KEYS = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
LEAVES = st.one_of(
    st.tuples(st.sampled_from(DTYPES), SHAPES, st.integers(0, 2**31 - 1), st.booleans()).map(lambda t: ("tensor", t)),
    st.one_of(st.integers(-(2**62), 2**62), st.text(max_size=20), st.floats(allow_nan=False),
              st.lists(st.integers(), max_size=4)).map(lambda v: ("object", v)),
)
STATES = st.recursive(st.dictionaries(KEYS, LEAVES, min_size=1, max_size=5),
                      lambda children: st.dictionaries(KEYS, children, min_size=1, max_size=3), max_leaves=12)

COUNTS = {"examples": 0}


def build(spec) -> dict:
    out = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            out[key] = build(value)
        elif value[0] == "tensor":
            dtype, shape, seed, transpose = value[1]
            g = torch.Generator().manual_seed(seed)
            t = (torch.randn(shape, generator=g) * 100).to(dtype) if dtype.is_floating_point or dtype.is_complex else torch.randint(0, 100, shape, generator=g).to(dtype)
            out[key] = t.t() if transpose and t.dim() == 2 else t
        else:
            out[key] = value[1]
    return out


@given(spec=STATES, engine=st.sampled_from(["threads", "io_uring"]), chunk_pages=st.integers(1, 4))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_state_dicts_round_trip_exactly(spec, engine, chunk_pages):
    state = build(spec)
    config = small_config(engine, chunk_bytes=4096 * chunk_pages, host_pool_bytes=4096 * chunk_pages * 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c"
        dcp.save(state, storage_writer=DataStatesWriter(path, config), no_dist=True)
        for reader in (DataStatesReader(path), dcp.FileSystemReader(path)):
            out = zeros_like_state(state)
            dcp.load(out, storage_reader=reader, no_dist=True)
            assert_state_equal(out, state)
    COUNTS["examples"] += 1
