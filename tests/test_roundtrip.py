"""Save -> load round trips through every DCP entry point, in both directions with stock DCP."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata,
)
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from conftest import assert_state_equal, sample_state, zeros_like_state
from dcp_datastates import DataStatesLoadPlanner, DataStatesReader, DataStatesSavePlanner


def load_with(reader, state: dict) -> dict:
    out = zeros_like_state(state)
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def test_save_then_load_with_our_reader(tmp_path, make_writer):
    state = sample_state()
    writer = make_writer(tmp_path / "ckpt")
    dcp.save(state, storage_writer=writer, no_dist=True)
    assert_state_equal(load_with(DataStatesReader(tmp_path / "ckpt"), state), state)


def test_stock_reader_reads_our_checkpoint(tmp_path, make_writer):
    state = sample_state()
    dcp.save(state, storage_writer=make_writer(tmp_path / "ckpt"), no_dist=True)
    assert_state_equal(load_with(dcp.FileSystemReader(tmp_path / "ckpt"), state), state)


@pytest.mark.parametrize("thread_count", [1, 3])
def test_our_reader_reads_stock_checkpoint(tmp_path, thread_count):
    state = sample_state()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "stock", thread_count=thread_count), no_dist=True)
    assert_state_equal(load_with(DataStatesReader(tmp_path / "stock"), state), state)


def test_our_files_hold_torch_save_records_byte_for_byte(tmp_path, make_writer):
    """Each tensor record must be exactly what torch.save writes (bar the data CRC torch.load skips)."""
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    dcp.save(state, storage_writer=make_writer(tmp_path / "c"), no_dist=True)
    metadata = DataStatesReader(tmp_path / "c").read_metadata()
    (info,) = metadata.storage_data.values()
    record = (tmp_path / "c" / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
    assert torch.load(__import__("io").BytesIO(record), weights_only=True).tolist() == state["w"].tolist()
    assert state["w"].numpy().tobytes() in record


def test_async_save_thread_mode(tmp_path, make_writer):
    state = sample_state()
    expected = copy.deepcopy(state)
    response = dcp.async_save(state, storage_writer=make_writer(tmp_path / "a"), no_dist=True)
    assert isinstance(response, AsyncSaveResponse)  # the writer stages lazily: two honest futures
    response.staging_completion.result()
    response.upload_completion.result()
    assert_state_equal(load_with(DataStatesReader(tmp_path / "a"), expected), expected)


def test_async_save_with_default_stager(tmp_path, make_writer):
    state = sample_state()
    stager = DefaultStager(StagingOptions(False, True, True, False))
    try:
        response = dcp.async_save(state, storage_writer=make_writer(tmp_path / "s"), async_stager=stager, no_dist=True)
        assert isinstance(response, AsyncSaveResponse)
        response.staging_completion.result()
        response.upload_completion.result()
    finally:
        stager.close()
    assert_state_equal(load_with(DataStatesReader(tmp_path / "s"), state), state)


def test_datastates_planners_round_trip(tmp_path, make_writer):
    state = sample_state()
    dcp.save(state, storage_writer=make_writer(tmp_path / "p"), planner=DataStatesSavePlanner(), no_dist=True)
    out = zeros_like_state(state)
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "p"), planner=DataStatesLoadPlanner(), no_dist=True)
    assert_state_equal(out, state)


def test_one_data_file_per_rank_with_few_large_writes(tmp_path, make_writer):
    """Thousands of small tensors are coalesced into one file and a handful of chunk-sized writes."""
    state = {f"layer{i}.bias": torch.full((16,), float(i)) for i in range(2000)}
    writer = make_writer(tmp_path / "many", chunk_bytes=1 << 20, host_pool_bytes=4 << 20)
    dcp.save(state, storage_writer=writer, no_dist=True)
    data_files = [p for p in (tmp_path / "many").iterdir() if p.suffix == ".distcp"]
    assert len(data_files) == 1
    assert writer.last_stats.tensor_writes == -(-writer.last_stats.tensor_bytes // (1 << 20))
    assert writer.last_stats.tensor_writes <= 4  # 2000 records of ~1.6 KB in 1 MiB writes
    out = {k: torch.zeros(16) for k in state}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "many"), no_dist=True)
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_pool_is_allocated_once_and_reused_across_saves(tmp_path, engine):
    from conftest import small_config
    from dcp_datastates import DataStatesWriter
    from dcp_datastates.buffer_pool import HostBufferPool

    config = small_config(engine, chunk_bytes=3 * 4096, host_pool_bytes=5 * 3 * 4096)
    state = {"x": torch.randn(50_000)}  # 200 KB: ~16x the 60 KB pool, so it must stream
    before = HostBufferPool.allocations
    pool = HostBufferPool.shared(config.chunk_bytes, config.pool_buffers, torch.cuda.is_available())
    acquired: list[int] = []  # which of the pool's buffers each chunk of the three saves went through
    real_acquire = pool.acquire

    def counting_acquire():
        buffer = real_acquire()
        acquired.append(buffer.index)
        return buffer

    pool.acquire = counting_acquire
    try:
        for i in range(3):
            writer = DataStatesWriter(tmp_path / f"c{i}", config)
            dcp.save(state, storage_writer=writer, no_dist=True)
    finally:
        del pool.acquire
    assert HostBufferPool.allocations - before <= 1
    # ~50 chunks of 12 KiB went through the same 5 buffers, and every one came back.
    assert len(acquired) == 3 * writer.last_stats.tensor_writes > 3 * pool.count
    assert set(acquired) <= set(range(pool.count)) and pool.in_use == 0
    out = {"x": torch.zeros(50_000)}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c2"), no_dist=True)
    assert torch.equal(out["x"], state["x"])


def test_metadata_pickles_equal_small_values_once_and_stock_dcp_reads_it(tmp_path, make_writer):
    """Equal properties, sizes and chunk records in ``.metadata`` are one object each (the pickle refers
    back to it instead of rebuilding it); the values are exactly stock DCP's, and both readers load it."""
    state: dict = {f"f{i}": torch.full((16,), float(i)) for i in range(300)}
    state |= {f"h{i}": torch.arange(i + 1, dtype=torch.float16) for i in range(3)}
    state |= {"m": torch.arange(6, dtype=torch.int64).reshape(2, 3), "extra": {"lr": 0.5, "step": 7}}
    dcp.save(state, storage_writer=make_writer(tmp_path / "ours"), no_dist=True)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "stock"), no_dist=True)
    ours = pickle.loads((tmp_path / "ours" / ".metadata").read_bytes())
    stock = pickle.loads((tmp_path / "stock" / ".metadata").read_bytes())

    assert ours.state_dict_metadata == stock.state_dict_metadata  # the same values as stock DCP's
    f = [ours.state_dict_metadata[f"f{i}"] for i in range(300)]
    assert all(m.properties is f[0].properties and m.size is f[0].size for m in f)
    assert all(m.chunks[0] is f[0].chunks[0] for m in f)
    h0, h1, m = (ours.state_dict_metadata[k] for k in ("h0", "h1", "m"))
    assert h0.properties is h1.properties and h0.properties.dtype == torch.float16
    assert h0.properties is not f[0].properties and m.properties.dtype == torch.int64
    assert h0.size is not h1.size and h0.chunks[0].offsets is f[0].chunks[0].offsets  # (0,) shared, (1,) != (2,)
    offsets = [index.offset for index in ours.storage_data if index.fqn.startswith("f")]
    assert len(offsets) == 300 and all(o is offsets[0] for o in offsets)
    assert all(MetadataIndex(f"f{i}", torch.Size([0])) in ours.storage_data for i in range(300))  # keys still hash
    stock_pickle = pickle.dumps(stock, protocol=pickle.HIGHEST_PROTOCOL)
    assert len((tmp_path / "ours" / ".metadata").read_bytes()) < 0.8 * len(stock_pickle)

    for reader in (DataStatesReader(tmp_path / "ours"), dcp.FileSystemReader(tmp_path / "ours")):
        assert_state_equal(load_with(reader, state), state)  # ours verifies the seal over these values


def test_pickling_metadata_leaves_the_callers_objects_and_other_types_as_they_were():
    """Sharing is for the file only: ``dcp.save`` returns a ``Metadata`` whose entries own their objects
    (editing one never edits another), and a custom planner's tuple offsets are pickled as they are."""
    from dcp_datastates.commit import pickle_metadata

    def entry(n: int, tuples: bool = False) -> TensorStorageMetadata:
        offsets, sizes = ((0,), (n,)) if tuples else (torch.Size([0]), torch.Size([n]))
        return TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([n]),
                                     [ChunkStorageMetadata(offsets, sizes)])  # type: ignore[arg-type]

    md = Metadata({"a": entry(4), "b": entry(4), "c": entry(2, tuples=True), "d": entry(4)})
    md.state_dict_metadata["d"].chunks = tuple(md.state_dict_metadata["d"].chunks)  # type: ignore[assignment]
    md.storage_data = {MetadataIndex(k, torch.Size([0])): _StorageInfo("__0_0.distcp", 0, 16) for k in "abd"}
    md.storage_data[MetadataIndex("c", (0,))] = _StorageInfo("__0_0.distcp", 16, 8)

    def objects(m: Metadata) -> list[int]:
        ids = []
        for e in m.state_dict_metadata.values():
            ids += [id(e.properties), id(e.size), id(e.chunks)] + [id(x) for ch in e.chunks for x in (ch, ch.offsets, ch.sizes)]
        return ids + [id(index.offset) for index in m.storage_data]

    before, expected = objects(md), copy.deepcopy(md)
    data = pickle_metadata(md)
    assert objects(md) == before and md == expected  # every field given back, values untouched
    loaded = pickle.loads(data)
    assert loaded == expected
    a, b, c = (loaded.state_dict_metadata[k] for k in "abc")
    assert a.properties is b.properties and a.chunks[0] is b.chunks[0] and a.size is b.size
    assert type(c.chunks[0].offsets) is tuple and c.chunks[0].offsets == (0,)  # other types: as they are
    assert type(loaded.state_dict_metadata["d"].chunks) is tuple
    assert MetadataIndex("c", (0,)) in loaded.storage_data and MetadataIndex("a", torch.Size([0])) in loaded.storage_data


def _digest_reference(metadata) -> str:
    """The seal's digest as first specified: one repr per entry (sealed checkpoints must keep verifying)."""
    parts = []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            p = md.properties
            chunks = [(tuple(ch.offsets), tuple(ch.sizes)) for ch in md.chunks]
            parts.append(repr((fqn, str(p.dtype), str(p.layout), p.requires_grad, str(p.memory_format),
                               p.pin_memory, tuple(md.size), chunks)))
        else:
            parts.append(repr((fqn, "object")))
    for index, info in metadata.storage_data.items():
        offset = None if index.offset is None else tuple(index.offset)
        parts.append(repr((index.fqn, offset, info.relative_path, info.offset, info.length)))
    return "\n".join(parts)


def test_seal_digest_of_shared_and_unshared_metadata_is_the_specified_one(tmp_path, make_writer, monkeypatch):
    """The digest built from per-object reprs equals the one-repr-per-entry definition, byte for byte."""
    import dcp_datastates.metadata_check as metadata_check

    state = {"a": torch.ones(4, 3), "b": torch.ones(4, 3, dtype=torch.bfloat16, requires_grad=True),
             "c": torch.zeros(()), "d": torch.arange(5), "n": {"lr": 0.1}, "e": torch.ones(4, 3)}
    dcp.save(state, storage_writer=make_writer(tmp_path / "ours"), no_dist=True)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "stock"), no_dist=True)
    chunked = pickle.loads((tmp_path / "stock" / ".metadata").read_bytes())  # two chunks of one tensor
    a = chunked.state_dict_metadata["a"]
    a.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3])),
                ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([2, 3]))]
    seen = []
    monkeypatch.setattr(metadata_check, "sha256_hex", lambda data: seen.append(data) or "digest")
    for source in (tmp_path / "ours" / ".metadata", tmp_path / "stock" / ".metadata", None):
        metadata = chunked if source is None else pickle.loads(source.read_bytes())
        metadata_check.metadata_digest(metadata)
        assert seen[-1].decode().startswith(_digest_reference(metadata) + "\n")
    assert "'a', 'torch.float32', 'torch.strided', False, 'torch.contiguous_format', False, (4, 3), " \
           "[((0, 0), (2, 3)), ((2, 0), (2, 3))])" in seen[-1].decode()
