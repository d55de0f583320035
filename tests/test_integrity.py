"""Checksum kernels, verify-on-load, the CLI, and safe loading of pickled content."""

from __future__ import annotations

import json
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException

from conftest import assert_state_equal, sample_state, small_config, zeros_like_state
from dcp_datastates import DataStatesReader, DataStatesWriter, UnsafeCheckpointError
from dcp_datastates.cli import main as cli_main
from dcp_datastates.kernels import block_checksums, xxh64


@given(st.binary(min_size=0, max_size=5000), st.integers(min_value=1, max_value=700))
@settings(max_examples=200, deadline=None)
def test_block_checksums_match_reference_xxh64(data, block):
    expected = [xxhash.xxh64_intdigest(data[i : i + block]) for i in range(0, len(data), block)]
    assert block_checksums(data, block) == expected


@pytest.mark.parametrize("length", [1, 7, 31, 32, 33, 1023, 4097, 1_000_003])
def test_xxh64_odd_lengths_and_offsets(length):
    data = np.random.default_rng(length).integers(0, 256, length + 13, dtype=np.uint8)
    assert int(xxh64(data, 13, length, np.uint64(0))) == xxhash.xxh64_intdigest(data[13:].tobytes())


@pytest.mark.parametrize("size, block", [(3 * 2**20 + 4093, 2**20), (2**20 + 7, 4096), (5 * 2**20 - 1, 65_537)])
def test_block_checksums_match_reference_xxh64_over_several_mib(size, block):
    """Many blocks and a ragged tail (the 5,000-byte property test cannot reach 1 MiB blocks)."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    expected = [xxhash.xxh64_intdigest(data[i : i + block]) for i in range(0, size, block)]
    assert len(expected) >= 4 and block_checksums(data, block) == expected


def test_stored_checksums_of_mib_sized_odd_records_match_reference_xxh64(tmp_path, engine):
    """Default 1 MiB checksum blocks over files of a few MiB with odd-sized records, both engines."""
    state = {"odd": torch.randint(0, 256, (3 * 2**20 + 4093,), dtype=torch.uint8), "f": torch.randn(300_001), "step": 7}
    config = small_config(engine, chunk_bytes="1MiB", host_pool_bytes="4MiB")
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c", config), no_dist=True)
    (side,) = list((tmp_path / "c").glob("__0_*_checksums.json"))
    files = json.loads(side.read_text())["files"]
    assert len(files) == 2  # the tensor file and the object file
    for name, entry in files.items():
        contents = (tmp_path / "c" / name).read_bytes()
        block = entry["block_bytes"]
        assert entry["size"] == len(contents) and (block == 2**20 or len(contents) < 2**20)
        assert [int(b, 16) for b in entry["blocks"]] == [xxhash.xxh64_intdigest(contents[i : i + block]) for i in range(0, len(contents), block)]
    assert len(files[data_file(tmp_path / "c").name]["blocks"]) >= 4


def save(path, state, engine="io_uring"):
    dcp.save(state, storage_writer=DataStatesWriter(path, small_config(engine)), no_dist=True)


def data_file(path: pathlib.Path) -> pathlib.Path:
    (found,) = [p for p in path.iterdir() if p.name.endswith("_0.distcp")]
    return found


def flip_byte_inside(path: pathlib.Path, key: str) -> int:
    """Flip one byte in the middle of ``key``'s raw tensor bytes; return its file offset."""
    metadata = DataStatesReader(path).read_metadata()
    (info,) = [i for idx, i in metadata.storage_data.items() if idx.fqn == key]
    offset = info.offset + info.length // 2
    with open(path / info.relative_path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    return offset


def test_checksums_are_stored_beside_the_data_and_stock_dcp_ignores_them(tmp_path, engine):
    state = sample_state()
    save(tmp_path / "c", state, engine)
    (side,) = list((tmp_path / "c").glob("__0_*_checksums.json"))
    document = json.loads(side.read_text())
    assert document["algorithm"] == "xxh64"
    for name, entry in document["files"].items():
        contents = (tmp_path / "c" / name).read_bytes()
        assert entry["size"] == len(contents)
        reference = [xxhash.xxh64_intdigest(contents[i : i + entry["block_bytes"]]) for i in range(0, len(contents), entry["block_bytes"])]
        assert [int(b, 16) for b in entry["blocks"]] == reference  # the reference package, not our kernel
    out = zeros_like_state(state)
    dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_path / "c"), no_dist=True)
    assert_state_equal(out, state)


def test_flipped_byte_is_caught_on_load_naming_key_file_and_offset(tmp_path):
    state = {"clean": torch.ones(100), "victim": torch.arange(5000.0)}
    save(tmp_path / "c", state)
    offset = flip_byte_inside(tmp_path / "c", "victim")
    block = offset // 8192 * 8192  # small_config: 8 KiB chunks -> 8 KiB checksum blocks
    name = data_file(tmp_path / "c").name
    with pytest.raises(CheckpointException, match=rf"(?s)ChecksumMismatchError: checksum mismatch in {name} at offset {block}.*'victim'"):
        dcp.load({"clean": torch.zeros(100), "victim": torch.zeros(5000)}, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    # the switch to skip verification reads the (corrupt) bytes as they are
    out = {"clean": torch.zeros(100), "victim": torch.zeros(5000)}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c", verify_checksums=False), no_dist=True)
    assert torch.equal(out["clean"], torch.ones(100)) and not torch.equal(out["victim"], state["victim"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcp_datastates", *args], capture_output=True, text=True, timeout=300)


def test_cli_verify_ok_then_corrupt(tmp_path):
    save(tmp_path / "c", {"a": torch.randn(3000), "b": torch.randn(50), "step": 3})
    ok = run_cli("verify", str(tmp_path / "c"))
    assert ok.returncode == 0 and ok.stdout.startswith("VERIFIED: 2 files"), ok.stdout + ok.stderr
    offset = flip_byte_inside(tmp_path / "c", "a")
    bad = run_cli("verify", str(tmp_path / "c"), "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    (problem,) = report["problems"]
    assert problem["file"] == data_file(tmp_path / "c").name and problem["keys"] == ["a"]
    assert problem["offset"] <= offset < problem["offset"] + problem["length"]
    text = run_cli("verify", str(tmp_path / "c"), "--no-progress")
    assert text.returncode == 1 and "CORRUPT" in text.stdout and "'a'" in text.stdout and "DAMAGED (1 problem)" in text.stdout


def test_cli_verify_reports_missing_files_and_unverified_stock_checkpoints(tmp_path):
    save(tmp_path / "c", {"a": torch.randn(100)})
    data_file(tmp_path / "c").unlink()
    missing = run_cli("verify", str(tmp_path / "c"), "--no-progress")
    assert missing.returncode == 1 and "file is missing" in missing.stdout
    dcp.save({"a": torch.randn(100)}, storage_writer=dcp.FileSystemWriter(tmp_path / "stock"), no_dist=True)
    stock = run_cli("verify", str(tmp_path / "stock"), "--no-progress")
    assert stock.returncode == 3 and "UNVERIFIED (no seal)" in stock.stdout, stock.stdout
    assert "unverified: it carries no seal" in stock.stdout
    not_ckpt = run_cli("verify", str(tmp_path))
    assert not_ckpt.returncode == 2 and "not a complete checkpoint" in not_ckpt.stderr


def test_cli_inspect_table_and_json(tmp_path, capsys):
    state = {"model": {"w": torch.randn(4, 6, dtype=torch.float64), "b": torch.zeros(6, dtype=torch.bfloat16)}, "step": 9}
    save(tmp_path / "c", state)
    assert cli_main(["inspect", str(tmp_path / "c")]) == 0
    table = capsys.readouterr().out
    assert "model.w" in table and "float64" in table and "4x6" in table and "192 B" in table
    assert "total: 3 keys (2 tensors, 1 object), 204 B of tensors, 2 data files, 1 rank\n" in table
    assert cli_main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    by_key = {e["key"]: e for e in info["entries"]}
    assert by_key["model.b"] == {"key": "model.b", "kind": "tensor", "dtype": "bfloat16", "shape": [6], "bytes": 12, "shards": 1, "ranks": [0]}
    assert by_key["step"]["kind"] == "object" and info["totals"]["tensor_bytes"] == 4 * 6 * 8 + 12


def test_cli_convert_to_torch_and_safetensors(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = {"model": {"w": torch.randn(4, 6), "b": torch.arange(6)}, "step": 9, "name": "run"}
    save(tmp_path / "c", state)
    assert cli_main(["convert", str(tmp_path / "c"), str(tmp_path / "out.pt"), "--to", "torch"]) == 0
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 9 and loaded["name"] == "run"
    assert cli_main(["convert", str(tmp_path / "c"), str(tmp_path / "out.st"), "--to", "safetensors"]) == 0
    tensors = load_file(tmp_path / "out.st")
    assert torch.equal(tensors["model.w"], state["model"]["w"]) and torch.equal(tensors["model.b"], state["model"]["b"])
    with safe_open(tmp_path / "out.st", "pt") as f:
        assert json.loads(f.metadata()["dcp_datastates.objects"]) == {"step": 9, "name": "run"}


class Planted:
    """A pickle that runs code when loaded: it creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_malicious_object_pickle_is_refused_by_default(tmp_path):
    marker = tmp_path / "pwned"
    save(tmp_path / "c", {"w": torch.ones(3), "extra": Planted(str(marker))})
    assert not marker.exists()
    with pytest.raises(CheckpointException, match=r"(?s)UnsafeCheckpointError: object 'extra'.*safe loading refuses.*trust_checkpoint=True"):
        dcp.load({"w": torch.zeros(3), "extra": None}, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert not marker.exists()
    # an explicit opt-in loads it -- and shows why it is opt-in
    dcp.load({"w": torch.zeros(3), "extra": None}, storage_reader=DataStatesReader(tmp_path / "c", trust_checkpoint=True), no_dist=True)
    assert marker.exists()


def test_malicious_metadata_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    save(tmp_path / "c", {"w": torch.ones(3)})
    (tmp_path / "c" / ".metadata").write_bytes(pickle.dumps(Planted(str(marker))))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata refers to pathlib\.Path\.touch|\.metadata refers to"):
        DataStatesReader(tmp_path / "c").read_metadata()
    assert not marker.exists()
    bad = run_cli("inspect", str(tmp_path / "c"))
    assert bad.returncode == 2 and "not a DCP metadata type" in bad.stderr and not marker.exists()


SHARDED_SAVE = """
import sys, warnings, torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards
warnings.filterwarnings("ignore")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
full = torch.arange(24.0).reshape(6, 4)
shards = [Shard(full[0:2].clone(), ShardMetadata([0, 0], [2, 4], "rank:0/cpu")),
          Shard(full[2:6].clone(), ShardMetadata([2, 0], [4, 4], "rank:0/cpu"))]
dcp.save({"w": init_from_local_shards(shards, [6, 4]), "step": 3}, storage_writer=dcp.FileSystemWriter(sys.argv[1]))
dist.destroy_process_group()
"""


def test_metadata_of_stock_and_sharded_checkpoints_loads_under_the_allowlist(tmp_path):
    dcp.save(sample_state(), storage_writer=dcp.FileSystemWriter(tmp_path / "stock"), no_dist=True)
    metadata = DataStatesReader(tmp_path / "stock").read_metadata()
    with open(tmp_path / "stock" / ".metadata", "rb") as f:
        assert pickle.load(f).state_dict_metadata.keys() == metadata.state_dict_metadata.keys()
    # A stock checkpoint of a tensor stored as two shards (a ShardedTensor, gloo, one process).
    done = subprocess.run([sys.executable, "-c", SHARDED_SAVE, str(tmp_path / "sharded")], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = DataStatesReader(tmp_path / "sharded").read_metadata()  # the allowlist, not pickle.load
    with open(tmp_path / "sharded" / ".metadata", "rb") as f:
        plain = pickle.load(f)  # paths come back as str under the allowlist; everything else is equal
    assert plain.state_dict_metadata == sharded.state_dict_metadata and plain.storage_data == sharded.storage_data
    assert [list(c.offsets) for c in sharded.state_dict_metadata["w"].chunks] == [[0, 0], [2, 0]]
    out = {"w": torch.zeros(6, 4), "step": 0}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "sharded"), no_dist=True)  # two shards into one tensor
    assert torch.equal(out["w"], torch.arange(24.0).reshape(6, 4)) and out["step"] == 3


def test_cli_bench_json_runs_every_method_side_by_side(tmp_path):
    done = run_cli("bench", "--size-gib", "0.07", "--repeats", "1", "--dir", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    methods = [row["method"] for row in report["save"]["rows"]]
    assert methods[0].startswith("raw O_DIRECT") and "stock FileSystemWriter (8 threads)" in methods
    assert "DataStatesWriter io_uring" in methods and "DataStatesWriter threads" in methods
    from dcp_datastates.bench import make_state, state_bytes

    saved = state_bytes(make_state(int(0.07 * 2**30), "cpu"))
    assert report["save"]["bytes"] == saved and saved <= report["verify"]["bytes"] < saved + 2**20  # what was measured
    for part in ("save", "verify"):
        for row in report[part]["rows"]:
            assert len(row["seconds"]) == 1 and row["median_seconds"] == row["seconds"][0] > 0
            assert row["median_gib_per_s"] == pytest.approx(report[part]["bytes"] / row["median_seconds"] / 2**30)
    assert list(tmp_path.iterdir()) == []  # the benchmark cleans up after itself
