"""Multi-rank saves and resharded loads, launched with torchrun (gloo on CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import small_config, torchrun_script
from dcp_datastates import DataStatesReader, DataStatesWriter

HERE = Path(__file__).parent / "multirank"
sys.path.insert(0, str(HERE))
from expected import full_tensors, object_placeholders, objects  # noqa: E402

pytestmark = pytest.mark.multirank


def torchrun(*args: str, timeout: int = 240) -> str:
    # "load-sharded" only reads: running it twice is the same as once (see torchrun_script)
    return torchrun_script("sharded_roundtrip.py", *args, timeout=timeout, rerun_teardown_abort=args[0] == "load-sharded")


def test_two_ranks_save_dtensors_then_reshard_and_load_on_one_rank(tmp_path):
    out = torchrun("save-and-reshard", str(tmp_path))
    for name in ("sync", "async_thread", "async_process"):
        for rank in (0, 1):
            assert f"rank {rank}: {name} resharded 2->2 OK" in out
        # 2 -> 1: a single process, plain tensors, reads what two ranks wrote as shards
        target = {k: torch.zeros_like(v) for k, v in full_tensors().items()} | object_placeholders()
        dcp.load(target, storage_reader=DataStatesReader(tmp_path / name), no_dist=True)
        for key, value in full_tensors().items():
            assert target[key].dtype == value.dtype and torch.equal(target[key], value), (name, key)
        for key, value in objects().items():
            assert target[key] == value, (name, key)
        # and stock DCP reads the sharded checkpoint too
        stock = {k: torch.zeros_like(v) for k, v in full_tensors().items()}
        dcp.load(stock, storage_reader=dcp.FileSystemReader(tmp_path / name), no_dist=True)
        assert all(torch.equal(stock[k], v) for k, v in full_tensors().items())
        data_files = sorted(p.name for p in (tmp_path / name).iterdir() if p.suffix == ".distcp")
        # per rank: one tensor file (plus an object file where a rank's objects survived dedup)
        assert [f[:4] for f in data_files if f.endswith("_0.distcp")] == ["__0_", "__1_"]
        assert len(data_files) <= 4


def test_one_rank_save_then_two_ranks_load_sharded(tmp_path):
    state = full_tensors() | objects()
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c", small_config("io_uring")), no_dist=True)
    out = torchrun("load-sharded", str(tmp_path / "c"))
    assert "rank 0: 1->2 OK" in out and "rank 1: 1->2 OK" in out


def test_random_dtensor_shardings_round_trip(tmp_path):
    """20 seeded random states: random shapes and dtypes, random placements on 1-D and 2-D meshes."""
    out = torchrun("random-shardings", str(tmp_path))
    assert "rank 0: random shardings OK (20 states)" in out and "rank 1: random shardings OK (20 states)" in out
