"""The staging future hands DCP a skeleton (meta tensors), never the live state (issue 14.4).

DCP plans on what the staging future returns, and a PROCESS executor pickles it to its
daemon: with the live state that meant every CUDA tensor over CUDA IPC and a CUDA context
in the daemon. A skeleton carries shapes, dtypes and placements only -- and the checkpoint
DCP describes from it must be the one it would describe from the live state.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from conftest import sample_state, small_config, zeros_like_state, assert_state_equal
from dcp_datastates import DataStatesReader, DataStatesWriter


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, list):
        return [t for v in value for t in tensors_in(v)]
    return []


def test_the_staging_future_resolves_to_meta_tensors_only(tmp_path):
    state = sample_state()
    writer = DataStatesWriter(tmp_path / "c", small_config("threads"))
    staged = writer.stage(state).result()
    tensors = tensors_in(staged)
    assert len(tensors) == len(tensors_in(state)) and all(t.is_meta for t in tensors)
    assert staged["step"] == 42 and staged["nested"]["name"] == "run-7"
    writer._snapshot.done.result()


def test_metadata_from_the_skeleton_equals_metadata_from_the_live_state(tmp_path):
    state = sample_state()
    state["grad_param"] = torch.nn.Parameter(torch.randn(4, 3))  # requires_grad is recorded in the metadata
    sync = dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "sync", small_config("threads")))
    for kind in (AsyncCheckpointerType.THREAD,):  # PROCESS with DTensors: tests/test_multirank.py, test_replicated.py
        path = tmp_path / kind.value
        dcp.async_save(
            state, storage_writer=DataStatesWriter(path, small_config("threads")), async_checkpointer_type=kind
        ).upload_completion.result()
        with open(path / ".metadata", "rb") as f:
            metadata = pickle.load(f)
        assert metadata.state_dict_metadata == sync.state_dict_metadata, kind
        loaded = zeros_like_state(state)
        dcp.load(loaded, storage_reader=DataStatesReader(path))
        assert_state_equal(loaded, state)
