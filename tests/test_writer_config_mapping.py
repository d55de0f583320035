"""``DataStatesWriter(path, {"io_engine": "threads"})``: a mapping is validated at construction (issue 15.6).

It used to fail late inside ``write_data`` (``'dict' object has no attribute 'chunk_bytes'``)
after an empty checkpoint directory had been created.
"""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter


def test_a_mapping_is_validated_into_a_config_and_used_by_the_save(tmp_path):
    fields = {"io_engine": "threads", "chunk_bytes": "8KiB", "host_pool_bytes": 32768, "io_threads": 2}
    writer = DataStatesWriter(tmp_path / "ckpt", fields)
    assert writer.config == DataStatesConfig(io_engine="threads", chunk_bytes=8192, host_pool_bytes=32768, io_threads=2)
    fields["io_engine"] = "io_uring"  # the writer keeps what it validated, not a live view of the dict
    assert writer.config.io_engine == "threads"

    state = {"w": torch.randn(5000, generator=torch.Generator().manual_seed(3)), "step": 7}
    dcp.save(state, storage_writer=writer, no_dist=True)
    assert writer.last_stats is not None and writer.last_stats.engine == "threads"
    assert writer.last_stats.tensor_writes >= 2  # 20000 bytes through 8 KiB chunks: the mapping's chunk size is used
    out = {"w": torch.zeros(5000), "step": 0}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "ckpt"), no_dist=True)
    assert torch.equal(out["w"], state["w"]) and out["step"] == 7


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"io_engine": "thread"}, "io_engine"),
        ({"io_engin": "threads"}, "io_engin"),
        ({"chunk_bytes": 5000}, "chunk_bytes"),
        ({"host_pool_bytes": "lots"}, "host_pool_bytes"),
    ],
)
def test_a_bad_mapping_fails_at_construction_naming_the_field_and_creates_nothing(tmp_path, fields, named):
    target = tmp_path / "ckpt"
    with pytest.raises(pydantic.ValidationError) as err:
        DataStatesWriter(target, fields)
    assert named in str(err.value) and "DataStatesConfig" in str(err.value)
    assert isinstance(err.value, ValueError)
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config", ["threads", True, 4096, ["io_engine", "threads"]])
def test_a_config_of_another_type_is_refused_with_the_fix(tmp_path, config):
    target = tmp_path / "ckpt"
    with pytest.raises(TypeError, match=r"must be a DataStatesConfig or a mapping of its fields, got .*DataStatesConfig\(io_engine='threads'\)"):
        DataStatesWriter(target, config)
    assert not target.exists()


def test_a_bad_mapping_passed_to_async_save_leaves_no_directory(tmp_path):
    """The user's exact call: the error comes from the constructor, before DCP or the disk is touched."""
    target = tmp_path / "ckpt"
    with pytest.raises(pydantic.ValidationError, match="io_engine"):
        dcp.async_save({"w": torch.ones(4)}, storage_writer=DataStatesWriter(target, {"io_engine": "uring"}), no_dist=True)
    assert not target.exists()
