"""The read path: read plan -> read engine -> verify -> deliver, exact for every box, dtype and layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import StreamTransformExtension, ZStandard
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from conftest import ENGINES, small_config
from dcp_datastates import DataStatesReader, DataStatesWriter
from dcp_datastates.errors import ChecksumMismatchError, UnsupportedCheckpointError
from dcp_datastates.native import create_read_engine, open_for_read
from dcp_datastates.native.read_engine import ReadRequest
from dcp_datastates.read_plan import contiguous_range
from dcp_datastates import read_stream


def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prove a path decodes tensors without torch.load: make torch.load fail."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on the framed path")

    monkeypatch.setattr(torch, "load", refuse)


# -- read engines ------------------------------------------------------------------------------------
def read_with(engine_name: str, path: Path, offset: int, length: int, direct: bool) -> bytes:
    import mmap
    import threading

    engine = create_read_engine(engine_name, io_threads=2, queue_depth=4)
    opened = open_for_read(str(path), direct)
    buffer = mmap.mmap(-1, max(4096, length))
    done = threading.Event()
    result: list = []

    def on_done(error, nbytes):
        result.append((error, nbytes))
        done.set()

    try:
        engine.submit(ReadRequest(opened.fd, str(path), memoryview(buffer)[:length], offset, on_done))
        assert done.wait(10)
    finally:
        engine.close()
        os.close(opened.fd)
    ((error, nbytes),) = result
    assert error is None
    return bytes(buffer[:nbytes])


@pytest.mark.parametrize("name", ENGINES)
@pytest.mark.parametrize("direct", [True, False])
def test_read_engines_read_exact_bytes_and_stop_at_end_of_file(tmp_path, name, direct):
    payload = os.urandom(5 * 4096 + 123)
    (tmp_path / "f").write_bytes(payload)
    for offset, length in [(0, 4096), (4096, 8192), (0, 6 * 4096), (4 * 4096, 4 * 4096), (8 * 4096, 4096)]:
        expected = payload[offset : offset + length]  # short (or empty) past the end of the file
        assert read_with(name, tmp_path / "f", offset, length, direct) == expected, (offset, length)


@pytest.mark.parametrize("name", ENGINES)
def test_read_error_names_file_and_offset(tmp_path, name):
    import threading

    fd = os.open(tmp_path / "w", os.O_WRONLY | os.O_CREAT, 0o644)
    engine = create_read_engine(name, io_threads=1, queue_depth=2)
    done, errors = threading.Event(), []
    try:
        engine.submit(ReadRequest(fd, str(tmp_path / "w"), memoryview(bytearray(4096)), 8192,
                                  lambda e, n: (errors.append(e), done.set())))
        assert done.wait(10)
    finally:
        engine.close()
        os.close(fd)
    (error,) = errors
    assert isinstance(error, OSError) and error.errno == 9  # EBADF: not open for reading
    assert str(tmp_path / "w") in str(error) and "offset 8192" in str(error)


# -- read plan -------------------------------------------------------------------------------------------
def test_contiguous_range_knows_which_boxes_are_one_run():
    shape = (4, 5, 6)
    assert contiguous_range(shape, (0, 0, 0), shape) == (0, 120)
    assert contiguous_range(shape, (1, 0, 0), (2, 5, 6)) == (30, 60)  # rows: Shard(0)
    assert contiguous_range(shape, (2, 3, 0), (1, 2, 6)) == (2 * 30 + 3 * 6, 12)
    assert contiguous_range(shape, (2, 3, 1), (1, 1, 4)) == (2 * 30 + 3 * 6 + 1, 4)
    assert contiguous_range(shape, (0, 0, 1), (4, 5, 2)) is None  # columns: Shard(1) of the last dim
    assert contiguous_range(shape, (1, 1, 0), (2, 2, 6)) is None
    assert contiguous_range((1, 3), (0, 1), (1, 2)) == (1, 2)
    assert contiguous_range((), (), ()) == (0, 1)


# -- deliver: every box, dtype and destination layout, records spanning windows --------------------------
class BoxPlanner(LoadPlanner):
    """A planner that asks for one box of one stored tensor, into a destination we choose."""

    def __init__(self, metadata, destination: torch.Tensor) -> None:
        self.metadata = metadata
        self.destination = destination
        self.committed: list[torch.Tensor] = []

    def set_up_planner(self, *args, **kwargs):  # pragma: no cover - not used by read_data
        pass

    def create_local_plan(self):  # pragma: no cover
        return LoadPlan([])

    def create_global_plan(self, plans):  # pragma: no cover
        return plans

    def finish_plan(self, plan):  # pragma: no cover
        return plan

    def load_bytes(self, read_item, value):  # pragma: no cover
        raise AssertionError("no objects here")

    def resolve_tensor(self, read_item):
        return self.destination

    def commit_tensor(self, read_item, tensor):
        self.committed.append(tensor)


STORED = torch.arange(24 * 40 * 7, dtype=torch.float64).reshape(24, 40, 7) * 1.5 - 77


def box_item(offsets: tuple[int, ...], lengths: tuple[int, ...]) -> ReadItem:
    return ReadItem(LoadItemType.TENSOR, MetadataIndex("w"), torch.Size([0] * len(offsets)),
                    MetadataIndex("w", torch.Size([0, 0, 0])), torch.Size(offsets), torch.Size(lengths))


BOXES = [
    ((0, 0, 0), (24, 40, 7)),  # whole
    ((5, 0, 0), (12, 40, 7)),  # rows (Shard(0))
    ((3, 4, 0), (1, 20, 7)),  # part of one row
    ((3, 4, 2), (1, 1, 5)),  # a run inside one innermost row
    ((2, 5, 1), (10, 30, 4)),  # not one run: decoded whole, then narrowed
    ((0, 0, 3), (24, 40, 1)),  # a column
]


def destinations(lengths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    reversed_ = torch.zeros(tuple(reversed(lengths)), dtype=torch.float64).permute(*reversed(range(len(lengths))))
    return {
        "contiguous": torch.zeros(lengths, dtype=torch.float64),
        "float32": torch.zeros(lengths, dtype=torch.float32),
        "non_contiguous": reversed_,
    }


@pytest.mark.parametrize("engine", ENGINES)
def test_every_box_into_every_destination_is_exact_without_torch_load(tmp_path, engine, monkeypatch):
    dcp.save({"w": STORED}, storage_writer=DataStatesWriter(tmp_path / "c", small_config(engine)), no_dist=True)
    reader = DataStatesReader(tmp_path / "c", config=small_config(engine))  # 8 KiB buffers: the 53 KiB record spans 7
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    no_torch_load(monkeypatch)
    for offsets, lengths in BOXES:
        expected = STORED[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
        for name, destination in destinations(lengths).items():
            planner = BoxPlanner(metadata, destination)
            reader.read_data(LoadPlan([box_item(offsets, lengths)]), planner).wait()
            assert torch.equal(destination, expected.to(destination.dtype)), (offsets, lengths, name)
            assert [t.data_ptr() for t in planner.committed] == [destination.data_ptr()]
            assert reader.last_read.framed == 1 and reader.last_read.windows >= 7
            assert reader.last_read.bytes_verified == reader.last_read.bytes_read > 0


def test_shape_mismatch_is_named(tmp_path):
    dcp.save({"w": STORED}, storage_writer=DataStatesWriter(tmp_path / "c"), no_dist=True)
    reader = DataStatesReader(tmp_path / "c")
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    with pytest.raises(OSError, match=r"'w': stored slice has shape \(24, 40, 7\), destination expects \(24, 40\)"):
        reader.read_data(LoadPlan([box_item((0, 0, 0), (24, 40, 7))]), BoxPlanner(metadata, torch.zeros(24, 40)))


@pytest.mark.parametrize("engine", ENGINES)
def test_many_small_tensors_are_coalesced_and_framed(tmp_path, engine, monkeypatch):
    g = torch.Generator().manual_seed(3)
    state = {"model": {f"t{i}": torch.randn(16, generator=g) for i in range(3000)}}
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c"), no_dist=True)
    target = {"model": {k: torch.zeros(16) for k in state["model"]}}
    reader = DataStatesReader(tmp_path / "c", config=small_config(engine, chunk_bytes="1MiB", host_pool_bytes="8MiB"))
    no_torch_load(monkeypatch)
    dcp.load(target, storage_reader=reader, no_dist=True)
    assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items())
    data = sum(p.stat().st_size for p in (tmp_path / "c").iterdir() if p.suffix == ".distcp")
    assert reader.last_read.records == reader.last_read.framed == 3000
    assert reader.last_read.windows <= -(-data // 1024**2)  # thousands of records, a handful of reads


def test_partial_load_reads_only_what_it_needs(tmp_path):
    state = {"a": torch.randn(1024**2), "b": torch.randn(1000), "c": torch.randn(1024**2)}
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c"), no_dist=True)
    target = {"b": torch.zeros(1000)}
    reader = DataStatesReader(tmp_path / "c")
    dcp.load(target, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    assert torch.equal(target["b"], state["b"])
    assert reader.last_read.bytes_read <= 2 * 1024**2 < 8 * 1024**2  # not the whole 8 MiB file


def test_dtype_conversion_on_load_matches_stock(tmp_path):
    state = {"w": torch.randn(300, 7), "i": torch.arange(50)}
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c"), no_dist=True)
    ours = {"w": torch.zeros(300, 7, dtype=torch.bfloat16), "i": torch.zeros(50, dtype=torch.float32)}
    stock = {"w": torch.zeros(300, 7, dtype=torch.bfloat16), "i": torch.zeros(50, dtype=torch.float32)}
    dcp.load(ours, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    dcp.load(stock, storage_reader=dcp.FileSystemReader(tmp_path / "c"), no_dist=True)
    assert torch.equal(ours["w"], stock["w"]) and torch.equal(ours["i"], stock["i"])
    assert torch.equal(ours["w"], state["w"].to(torch.bfloat16))


# -- stock checkpoints ---------------------------------------------------------------------------------------
def stock_state() -> dict:
    g = torch.Generator().manual_seed(5)
    return {
        "w": torch.randn(64, 33, generator=g),
        "t": torch.randn(9, 40, generator=g).t(),  # saved by stock with its strides: not our framing
        "h": torch.randn(100, generator=g).to(torch.float16),
        "step": 7,
        "cfg": {"lr": 0.1, "name": "x"},
    }


def blank(state: dict) -> dict:
    return {k: torch.zeros_like(v.contiguous()) if isinstance(v, torch.Tensor)
            else ({kk: None for kk in v} if isinstance(v, dict) else None) for k, v in state.items()}


def assert_loaded(target: dict, state: dict) -> None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert target[key].dtype == value.dtype and torch.equal(target[key], value), key
        else:
            assert target[key] == value, key


def test_stock_checkpoint_contiguous_records_take_the_framed_path(tmp_path):
    state = stock_state()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "c", thread_count=2), no_dist=True)
    target = blank(state)
    reader = DataStatesReader(tmp_path / "c")
    dcp.load(target, storage_reader=reader, no_dist=True)
    assert_loaded(target, state)
    # w and h are byte-identical to our framing; t carries its strides and is decoded by torch.load
    assert reader.last_read.framed == 2


def test_stock_zstd_checkpoint_loads(tmp_path):
    pytest.importorskip("zstandard", reason="torch's ZStandard extension needs the zstandard package (test extra)")
    state = stock_state()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "c", _extensions=[ZStandard()]), no_dist=True)
    metadata = dcp.FileSystemReader(tmp_path / "c").read_metadata()
    assert all(info.transform_descriptors == ["stream.zstd/1"] for info in metadata.storage_data.values())
    target = blank(state)
    reader = DataStatesReader(tmp_path / "c")
    dcp.load(target, storage_reader=reader, no_dist=True)
    assert_loaded(target, state)
    assert reader.last_read.framed == 0  # compressed records are never taken for framed ones


class Identity(StreamTransformExtension):
    """A transform our reader does not know (not in torch's registry)."""

    @staticmethod
    def registry_name() -> str:
        return "test.identity"

    @staticmethod
    def from_descriptor(version: str) -> "Identity":
        return Identity()

    def get_descriptor(self) -> str:
        return "test.identity/1"

    def transform_to(self, output):
        return output

    def transform_from(self, input):
        return input


def test_unknown_transform_is_unsupported_not_damaged(tmp_path):
    state = {"w": torch.randn(10)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "c", _extensions=[Identity()]), no_dist=True)
    with pytest.raises(CheckpointException, match=r"(?s)UnsupportedCheckpointError: unsupported: stream transform \['test.identity/1'\]") as info:
        dcp.load({"w": torch.zeros(10)}, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert "damaged" not in str(info.value)


def test_zstd_without_its_module_is_unsupported_and_says_what_to_install(tmp_path, monkeypatch):
    pytest.importorskip("zstandard")
    state = {"w": torch.randn(10)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "c", _extensions=[ZStandard()]), no_dist=True)
    monkeypatch.setattr(ZStandard, "is_available", staticmethod(lambda: False))
    reader = DataStatesReader(tmp_path / "c")
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    planner = DefaultLoadPlanner()
    planner.set_up_planner({"w": torch.zeros(10)}, metadata, True)
    with pytest.raises(UnsupportedCheckpointError, match=r"unsupported: stream transform \['stream.zstd/1'\].*pip install zstandard"):
        reader.read_data(planner.create_local_plan(), planner)


# -- failures --------------------------------------------------------------------------------------------
def test_failed_load_returns_every_buffer_and_the_next_load_works(tmp_path):
    state = {"a": torch.randn(3 * 1024**2), "b": torch.randn(3 * 1024**2)}
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c"), no_dist=True)
    (data,) = [p for p in (tmp_path / "c").iterdir() if p.name.endswith("_0.distcp")]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "bad").mkdir()
    for p in (tmp_path / "c").iterdir():
        (tmp_path / "bad" / p.name).write_bytes(bytes(raw) if p == data else p.read_bytes())
    config = small_config("io_uring", chunk_bytes="1MiB", host_pool_bytes="8MiB")  # 24 windows, 8 in flight
    read_stream.release_idle_pools()
    from dcp_datastates.buffer_pool import HostBufferPool

    allocations = HostBufferPool.allocations
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch"):
        reader = DataStatesReader(tmp_path / "bad", config=config)
        metadata = reader.read_metadata()
        reader.set_up_storage_reader(metadata, True)
        planner = DefaultLoadPlanner()
        planner.set_up_planner({k: torch.zeros_like(v) for k, v in state.items()}, metadata, True)
        reader.read_data(planner.create_local_plan(), planner)
    (pools,) = read_stream._idle_pools.values()  # the failed load's pool is back, every buffer in it
    assert len(pools) == 1 and pools[0].in_use == 0 and HostBufferPool.allocations == allocations + 1
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(target, storage_reader=DataStatesReader(tmp_path / "c", config=config), no_dist=True)
    assert all(torch.equal(target[k], v) for k, v in state.items())
    assert HostBufferPool.allocations == allocations + 1  # and the next load reuses it


def test_buffers_are_reused_by_later_loads(tmp_path):
    state = {"a": torch.randn(100_000)}
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c"), no_dist=True)
    config = small_config("threads", chunk_bytes="64KiB", host_pool_bytes="1MiB")
    dcp.load({"a": torch.zeros(100_000)}, storage_reader=DataStatesReader(tmp_path / "c", config=config), no_dist=True)
    from dcp_datastates.buffer_pool import HostBufferPool

    before = HostBufferPool.allocations
    target = {"a": torch.zeros(100_000)}
    dcp.load(target, storage_reader=DataStatesReader(tmp_path / "c", config=config), no_dist=True)
    assert HostBufferPool.allocations == before and torch.equal(target["a"], state["a"])


@pytest.mark.gpu
def test_load_into_gpu_destinations_is_exact(tmp_path):
    state = {"w": torch.randn(3 * 1024**2 + 5), "s": torch.randn(7, 9), "b": torch.randn(50).to(torch.bfloat16)}
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c"), no_dist=True)
    target = {k: torch.zeros_like(v, device="cuda") for k, v in state.items()}
    reader = DataStatesReader(tmp_path / "c", config=small_config("io_uring", chunk_bytes="1MiB", host_pool_bytes="4MiB"))
    dcp.load(target, storage_reader=reader, no_dist=True)
    read = reader.last_read
    assert read.framed == 3
    # asynchronous host-to-device copies out of pinned buffers, each buffer refilled only after its event
    assert read.pinned and read.device_copies >= 3 and read.copy_events >= 3, read
    assert all(torch.equal(target[k].cpu(), v) for k, v in state.items())


@pytest.mark.parametrize("verify", [True, False])
def test_records_split_anywhere_across_windows(tmp_path, verify, monkeypatch):
    """4 KiB windows over records of 1.5-3 KiB: prefixes, data and suffixes split at every kind of place."""
    g = torch.Generator().manual_seed(11)
    state = {f"t{i}": torch.randn(int(torch.randint(1, 400, (1,), generator=g)), generator=g) for i in range(300)}
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c", small_config("threads")), no_dist=True)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    reader = DataStatesReader(tmp_path / "c", verify_checksums=verify,
                              config=small_config("io_uring", chunk_bytes=4096, host_pool_bytes=4 * 4096))
    no_torch_load(monkeypatch)
    dcp.load(target, storage_reader=reader, no_dist=True)
    assert all(torch.equal(target[k], v) for k, v in state.items())
    assert reader.last_read.framed == 300
    assert reader.last_read.windows >= reader.last_read.bytes_read // 8192


def test_a_stock_checkpoint_of_a_file_per_tensor_keeps_few_files_open(tmp_path):
    import resource

    state = {f"t{i}": torch.full((100,), float(i)) for i in range(300)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "c", single_file_per_rank=False), no_dist=True)
    assert sum(p.suffix == ".distcp" for p in (tmp_path / "c").iterdir()) == 300
    target = {k: torch.zeros(100) for k in state}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(200, hard), hard))  # fewer than the checkpoint's files
    try:
        dcp.load(target, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert all(torch.equal(target[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", ENGINES)
def test_windows_are_checked_on_the_engine_thread_and_a_failed_check_is_raised_in_its_turn(tmp_path, name):
    """The check runs where the read completed (not the caller's thread), sees exactly the window's bytes,
    and what it raises reaches the caller only after every window before it was delivered."""
    import threading

    from dcp_datastates.read_plan import Window

    payload = bytes(range(256)) * 64 * 10  # 160 KiB = ten 16 KiB windows, the last one short of its read
    (tmp_path / "f").write_bytes(payload[:-100])
    size, step = len(payload) - 100, 16384
    windows = [Window(0, start, min(start + step, size), step) for start in range(0, size, step)]
    seen: dict[int, tuple[bytes, str]] = {}

    def check(window: Window, data: memoryview) -> bool:
        seen[window.start] = (bytes(data), threading.current_thread().name)
        if window.start == 6 * step:
            raise ChecksumMismatchError(f"window at {window.start}")
        return window.start != 2 * step  # "no checksums for this one"

    opened = open_for_read(str(tmp_path / "f"), False)
    engine = create_read_engine(name, io_threads=2, queue_depth=4)
    delivered: list[tuple[int, bytes, bool]] = []
    try:
        with read_stream.checkout_pool(step, 3, False) as pool:
            with pytest.raises(ChecksumMismatchError, match=f"window at {6 * step}"):
                for landed in read_stream.stream_windows(windows, lambda index: (opened.fd, "f"), engine, pool,
                                                         check=check):
                    delivered.append((landed.window.start, bytes(landed.buffer.view[: landed.valid]), landed.checked))
            assert pool.in_use == 0
    finally:
        engine.close()
        os.close(opened.fd)
    assert [start for start, _, _ in delivered] == [i * step for i in range(6)]
    for start, data, checked in delivered:
        assert data == payload[start:start + step] == seen[start][0]
        assert checked == (start != 2 * step)
    assert seen[6 * step][0] == payload[6 * step:7 * step]
    assert all(thread != threading.current_thread().name for _, thread in seen.values())
