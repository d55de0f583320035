"""Replicated state is written once (issue 16.1): bytes on disk equal stock dcp.save's, every save path.

Launched with torchrun --nproc_per_node=2 (gloo on CPU): DDP-style plain tensors on both
ranks, DTensors with Replicate() on a 1-D mesh and on one dimension of 2-D (HSDP-like)
meshes. Before this, ``dcp.async_save`` with our writer wrote every replicated byte once
per rank (2x stock here).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_datastates import DataStatesReader

HERE = Path(__file__).parent / "multirank"
sys.path.insert(0, str(HERE))
from replicated_save import full_state  # noqa: E402

pytestmark = pytest.mark.multirank

OURS = ("sync", "async_thread", "async_process")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("replicated")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE / "replicated_save.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert "rank 0: replicated OK" in proc.stdout and "rank 1: replicated OK" in proc.stdout  # 2 -> 2 loads exact
    # ranks share one stdout: another rank's line may land right after the JSON, before its newline
    (found,) = re.findall(r"BYTES (\{[^{}]*\})", proc.stdout)
    return out, json.loads(found)


@pytest.mark.parametrize("name", OURS)
def test_replicated_state_takes_the_same_bytes_as_stock(saved, name):
    _, sizes = saved
    replicated = 4 * 4 * 256 * 1024 + 4 * 512 * 512 + 4 * 256 * 1024  # ddp.w*, rep1d, hsdp_a: written once
    assert sizes["stock"] > replicated
    assert sizes[name] == sizes["stock"], sizes


@pytest.mark.parametrize("name", OURS)
def test_one_save_has_one_tag_and_loads_exactly_on_one_rank(saved, name):
    out, _ = saved
    directory = out / name
    names = [p.name for p in directory.iterdir() if p.name.startswith("__")]
    tags = {re.match(r"^__\d+_([0-9a-f]+)_", n).group(1) for n in names}
    assert len(tags) == 1, names
    assert {n[:4] for n in names} == {"__0_", "__1_"}
    expected = full_state()
    for reader in (DataStatesReader(directory), dcp.FileSystemReader(directory)):
        target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in expected.items()}
        target["run"] = {"name": None, "tags": None}
        dcp.load(target, storage_reader=reader, no_dist=True)
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert target[key].dtype == value.dtype and torch.equal(target[key], value), (name, key)
            else:
                assert target[key] == value, (name, key)


@pytest.mark.parametrize("name", OURS)
def test_metadata_describes_the_same_checkpoint_as_stock(saved, name):
    """The async saves' metadata is planned on the staging skeleton (meta tensors, DTensors included)."""
    import pickle

    out, _ = saved
    with open(out / "stock" / ".metadata", "rb") as f:
        stock = pickle.load(f)
    with open(out / name / ".metadata", "rb") as f:
        ours = pickle.load(f)
    assert ours.state_dict_metadata == stock.state_dict_metadata
