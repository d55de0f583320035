"""Safe unpickling changes nothing it did not build, resolves no name past the allowlist, and runs in linear time.

Each case is a hostile pickle built opcode by opcode (``hostile_pickles``): an allowlisted call
returning a shared object (an enum member, a layout, a class, a dtype) that the pickle then
rewrites through BUILD / SETITEM(S) / APPEND(S) / ADDITEMS, by every route to it; copyreg
extension codes; dicts and sets of keys with equal hashes. Every one must give one of our typed
errors naming the file, leave the process as it was, and never run anything. Floods run in a
subprocess with a timeout (a regression would hang), against an honest file's time measured in
the same process.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import textwrap
import time
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

import hostile_pickles as hp
from conftest import small_config
from dcp_datastates import (
    CorruptCheckpointError,
    DataStatesReader,
    DataStatesWriter,
    UnsafeCheckpointError,
)
from dcp_datastates.cli import describe
from dcp_datastates.metadata_check import read_checkpoint_metadata
from dcp_datastates.safe_pickle import _PLAIN_DATA_GLOBALS, check_object_record, load_metadata_bytes
from dcp_datastates.verify import verify_checkpoint

STATE = {"w": torch.arange(6.0), "step": 7}


def save(path: Path, state: dict | None = None) -> Path:
    dcp.save(state or STATE, storage_writer=DataStatesWriter(path, small_config("threads")), no_dist=True)
    return path


def load_failure(path: Path, out: dict, **reader: object) -> BaseException:
    with pytest.raises(CheckpointException) as caught:
        dcp.load(out, storage_reader=DataStatesReader(path, **reader), no_dist=True)
    (failure,) = caught.value.failures.values()
    return failure[0] if isinstance(failure, tuple) else failure


@pytest.fixture(scope="module")
def real_metadata(tmp_path_factory) -> bytes:
    """A stock DCP ``.metadata``, re-pickled without frames so a hostile prefix can run first."""
    path = tmp_path_factory.mktemp("stock")
    dcp.save(STATE, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    return hp.frameless(pickle.loads((path / ".metadata").read_bytes()))


# -- shared objects --------------------------------------------------------------------------------
def test_every_route_to_a_shared_object_and_every_mutation_is_refused_and_changes_nothing(real_metadata):
    load_metadata_bytes(real_metadata, "x/.metadata", trust=False)  # the unedited file loads
    before = hp.process_state()
    outcomes = Counter()
    for route in hp.shared_routes():
        for mutation in hp.mutations():
            with pytest.raises(CorruptCheckpointError, match=r"^ckpt/\.metadata is damaged: it (sets the state of|adds "
                               r"items to|appends to) an object it did not create \(") as caught:
                load_metadata_bytes(hp.hostile_metadata(real_metadata, route, mutation), "ckpt/.metadata", trust=False)
            outcomes[str(caught.value).split(" an object")[0].rsplit(" it ", 1)[1]] += 1
            assert hp.process_state() == before, (route, mutation)
    assert sum(outcomes.values()) == len(hp.shared_routes()) * len(hp.mutations()) == 84, outcomes


def test_the_issue_example_renames_an_enum_under_plain_pickle_but_not_here(tmp_path):
    from torch.distributed.checkpoint.planner import WriteItemType

    data = b"\x80\x02(ctorch.distributed.checkpoint.planner\nWriteItemType\nK\x01o}\x8c\x06_name_\x8c\x05PWNEDsb."
    ckpt = save(tmp_path / "c")
    (ckpt / ".metadata").write_bytes(data)
    before = hp.process_state()
    with pytest.raises(CorruptCheckpointError, match=rf"{ckpt}/\.metadata is damaged: it sets the state of an object it "
                       r"did not create \(the object torch\.distributed\.checkpoint\.planner\.WriteItemType\(\.\.\.\) returned"):
        DataStatesReader(ckpt).read_metadata()
    assert hp.process_state() == before and WriteItemType(1).name == "TENSOR"
    # the same edit of the memory-format encoding: every later honest save of the process still loads exactly
    encoding = (b"\x80\x02(ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\nK\x00o}" + hp.ustr("_value_")
                + b"K\x07sb.")
    with pytest.raises(CorruptCheckpointError, match="an object it did not create"):
        load_metadata_bytes(encoding, "x/.metadata", trust=False)
    honest = save(tmp_path / "after")
    out = {"w": torch.zeros(6), "step": 0}
    dcp.load(out, storage_reader=DataStatesReader(honest), no_dist=True)
    assert torch.equal(out["w"], STATE["w"]) and out["step"] == 7
    try:  # what stock unpickling does with the first one: the member renamed for the whole process
        assert pickle.loads(data) is WriteItemType(1) and WriteItemType(1).name == "PWNED"
    finally:
        WriteItemType(1)._name_ = "TENSOR"


def test_object_records_cannot_rewrite_shared_objects_even_of_admitted_classes(tmp_path):
    """Torch's weights-only loader BUILDs any instance of an admitted class: an admitted enum's member too."""
    with torch.serialization.safe_globals([hp.Shade]):
        check_object_record(hp.object_record(hp.whole(b"N", 2)), "k", "f", 0)  # torch's lazy imports happen here
        before = hp.process_state()
        for route, program in hp.object_record_routes().items():
            for mutation in hp.OBJECT_RECORD_MUTATIONS:
                record = hp.object_record(hp.whole(program + hp.mutations(hp.xstr)[mutation], 2))
                with pytest.raises(CorruptCheckpointError, match=r"^object 'k' \(f at offset 0, \d+ bytes\) is damaged: "
                                   r"it (sets the state of|adds items to|appends to) an object it did not create"):
                    check_object_record(record, "k", "f", 0)
                assert hp.process_state() == before, (route, mutation)
        # ... while the members themselves load, and torch's own loader would have renamed one
        check_object_record(hp.object_record(hp.whole(hp.object_record_routes()["REDUCE(user enum)"], 2)), "k", "f", 0)
        hostile = hp.object_record(hp.whole(hp.object_record_routes()["REDUCE(user enum)"] + hp.mutations(hp.xstr)["BUILD dict"], 2))
        try:
            assert torch.load(io.BytesIO(hostile), weights_only=True) is hp.Shade.LIGHT and hp.Shade.LIGHT.name == "PWNED"
        finally:
            hp.Shade.LIGHT._name_ = "LIGHT"


# -- copyreg extension codes -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(hp.EXT_CODES))
def test_extension_codes_are_refused_even_where_registered(tmp_path, kind, real_metadata):
    marker = tmp_path / "pwned"
    ckpt = save(tmp_path / "c")
    command = f"touch {marker}"
    with hp.registered_extension():
        before = hp.process_state()
        (ckpt / ".metadata").write_bytes(real_metadata[:2] + hp.ext_call(kind, command) + real_metadata[2:])
        with pytest.raises(UnsafeCheckpointError, match=rf"{ckpt}/\.metadata refers to copyreg extension code "
                           rf"{hp.EXT_CODES[kind]}, which resolves a name without the allowlist.*trust_checkpoint=True"):
            read_checkpoint_metadata(ckpt, trust=False)
        record = hp.object_record(hp.whole(hp.ext_call(kind, command) + b"N", 2))
        with pytest.raises(UnsafeCheckpointError, match=rf"object 'k' .* refers to copyreg extension code {hp.EXT_CODES[kind]}"):
            check_object_record(record, "k", "f", 0)
        assert hp.process_state() == before
    assert not marker.exists()


# -- hash floods -----------------------------------------------------------------------------------
_FLOODS = textwrap.dedent("""
    import json, pickle, sys, time
    sys.path.insert(0, {tests!r})
    import hostile_pickles as hp
    from test_safe_unpickling import honest_metadata
    from dcp_datastates import DataStatesError
    from dcp_datastates.safe_pickle import _PLAIN_DATA_GLOBALS, check_object_record, load_metadata_bytes

    def timed(load, data):
        start = time.perf_counter()
        try:
            load(data)
            return ["loaded", "", time.perf_counter() - start, len(data)]
        except DataStatesError as exc:
            return [type(exc).__name__, str(exc), time.perf_counter() - start, len(data)]

    metadata = lambda data: load_metadata_bytes(data, "ckpt/.metadata", trust=False)
    record = lambda data: check_object_record(data, "k", "f", 0)
    out = {{"honest .metadata": timed(metadata, honest_metadata(10_000))}}
    out["honest record"] = timed(record, hp.object_record(hp.whole(hp.fragment(list(range(40_000)), 2), 2)))
    out[".metadata: set of 40k complex"] = timed(metadata, hp.whole(hp.complex_set(hp.colliding_complex(40_000))))
    out[".metadata: MetadataIndex offsets"] = timed(metadata, hp.colliding_storage_metadata(3_000))
    for name, make in hp.COLLIDING.items():
        items = make(1_000)
        out[f".metadata: set of {{name}}"] = timed(metadata, hp.whole(hp.set_of(items)))
        out[f".metadata: dict keys {{name}}"] = timed(metadata, hp.whole(hp.dict_of(items)))
        out[f"record: set of {{name}}"] = timed(record, hp.object_record(hp.whole(hp.set_by_call(items), 2)))
        out[f"record: dict keys {{name}}"] = timed(record, hp.object_record(hp.whole(hp.dict_of(items, 2), 2)))
    out["record: set of big ints"] = timed(record, hp.object_record(hp.whole(hp.set_by_call(hp.colliding_big_ints(1_000)), 2)))
    print(json.dumps(out))
""")


def honest_metadata(records: int, size: int = 16) -> bytes:
    """An honest ``.metadata`` of ``records`` object records of ``size`` bytes (about 100 bytes of pickle each)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    sdm = {f"k{i}": BytesStorageMetadata() for i in range(records)}
    storage = {MetadataIndex(f"k{i}"): _StorageInfo("__0_ab_1.distcp", size * i, size) for i in range(records)}
    return pickle.dumps(Metadata(sdm, planner_data={f"k{i}": (f"k{i}",) for i in range(records)}, storage_data=storage),
                        protocol=pickle.HIGHEST_PROTOCOL)


def test_hash_floods_are_refused_in_time_linear_in_the_file():
    done = subprocess.run([sys.executable, "-c", _FLOODS.format(tests=str(Path(__file__).parent))],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    honest_kind, _, honest_s, honest_bytes = results.pop("honest .metadata")
    record_kind, _, record_s, record_bytes = results.pop("honest record")
    assert honest_kind == record_kind == "loaded" and honest_bytes > 1_000_000
    assert len(results) == 2 + 4 * len(hp.COLLIDING) + 1
    for name, (kind, message, seconds, size) in results.items():
        where = "ckpt/.metadata" if name.startswith(".metadata") else "object 'k' (f at offset 0"
        assert kind in ("UnsafeCheckpointError", "CorruptCheckpointError") and message.startswith(where), (name, kind, message)
        refusal = "as a dict key or set member; safe loading admits only strings" if name.startswith(".metadata: ") \
            and "MetadataIndex" not in name else "share one hash value"
        assert refusal in message, (name, message)
        per_byte = honest_s / honest_bytes if name.startswith(".metadata") else record_s / record_bytes
        # linear: no slower per byte than an honest file (x4 for noise on a shared machine), and seconds, not minutes
        assert seconds < 4 * per_byte * size + 1.0, (name, seconds, size, per_byte)
    assert "more than 8 storage_data keys share one hash value" in results[".metadata: MetadataIndex offsets"][1]
    assert "17 keys of one dict or set share one hash value" in results["record: dict keys int pairs"][1]
    assert results[".metadata: set of 40k complex"][3] > 0.8 * 2**20  # the issue's 50-125 s example: 40k, 0.84 MiB


def _same(a: object, b: object) -> bool:
    """Equal values of equal types, tensors by content, an OrderedDict's ``_metadata`` too."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
                and getattr(a, "_metadata", None) == getattr(b, "_metadata", None))
    return a == b


def test_ordinary_objects_still_load_unchanged():
    od = OrderedDict(a=1, b=torch.ones(2))
    od._metadata = {"": {"version": 1}}
    values = {
        "ordered dict with metadata": od, "counter": Counter("hello"), "set": {1, 2.5, None, True, (1, 2), "a"},
        "frozenset": frozenset({3, 1}), "complex key": {complex(1, 2): 3}, "bytes": {b"": 1, b"ab": 2},
        "tuple keys": {(i, str(i)): i for i in range(2000)}, "int keys": {i: -i for i in range(20_000)},
        "colliding pair -1/-2": {-1: 0, -2: 1}, "big int": 2**200, "size key": {torch.Size([1, 2]): 1},
        "devices": {torch.device("cpu"): 1, torch.device("cuda", 1): 2}, "dtype keys": {torch.float32: 1, torch.int8: 2},
        "tensors": {"t": torch.arange(3), "p": torch.nn.Parameter(torch.ones(2))}, "bytearray": bytearray(b"xy"),
    }
    for name, value in values.items():
        buffer = io.BytesIO()
        torch.save(value, buffer)
        check_object_record(buffer.getvalue(), name, "f", 0)
        with torch.serialization.safe_globals(_PLAIN_DATA_GLOBALS):
            loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        assert _same(loaded, value), name
    with torch.serialization.safe_globals([io.BytesIO, hp.Shade]):
        for value in (io.BytesIO(b"abc"), hp.Shade.DARK, {hp.Shade.LIGHT: 1}):  # NEWOBJ + BUILD of a fresh BytesIO
            buffer = io.BytesIO()
            torch.save(value, buffer)
            check_object_record(buffer.getvalue(), "k", "f", 0)



class _Reduced:
    """Pickles as ``(callable, args)``: how a class's ``__reduce__`` hands an OrderedDict its items."""

    def __init__(self, func: object, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _record(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_an_ordered_dict_built_from_pairs_loads_and_its_keys_are_still_counted():
    pairs = [("lr", 0.1), ("betas", (0.9, 0.95)), (3, "three")]
    data = _record(_Reduced(OrderedDict, (pairs,)))
    check_object_record(data, "k", "f", 0)
    with torch.serialization.safe_globals(_PLAIN_DATA_GLOBALS):
        assert _same(torch.load(io.BytesIO(data), weights_only=True), OrderedDict(pairs))
    colliding = hp.colliding_pairs(2000)  # tuples of ints with one hash value: a flood through the pairs' keys
    start = time.perf_counter()
    with pytest.raises(CorruptCheckpointError, match="share one hash value"):
        check_object_record(_record(_Reduced(OrderedDict, ([(k, 0) for k in colliding],))), "k", "f", 0)
    assert time.perf_counter() - start < 2.0
    for not_pairs in ([1, 2], [(1, 2, 3)], [[("a", 1)]]):
        with pytest.raises(CorruptCheckpointError, match="not from .key, value. pairs"):
            check_object_record(_record(_Reduced(OrderedDict, (not_pairs,))), "k", "f", 0)

# -- numpy, ZStandard ------------------------------------------------------------------------------
def test_numpy_objects_need_trust_and_load_exactly_with_it(tmp_path):
    state = {"w": torch.ones(2), "array": np.arange(5, dtype=np.int16), "scalar": np.float64(1.25)}
    ckpt = save(tmp_path / "c", state)
    failure = load_failure(ckpt, {"w": torch.zeros(2), "array": None, "scalar": None})
    assert isinstance(failure, UnsafeCheckpointError), repr(failure)
    assert "is a pickle that safe loading refuses: it refers to numpy" in str(failure)
    assert "trust_checkpoint=True" in str(failure) and "damaged" not in str(failure)
    out = {"w": torch.zeros(2), "array": None, "scalar": None}
    dcp.load(out, storage_reader=DataStatesReader(ckpt, trust_checkpoint=True), no_dist=True)
    assert out["array"].dtype == np.int16 and out["array"].tolist() == [0, 1, 2, 3, 4]
    assert type(out["scalar"]) is np.float64 and out["scalar"] == 1.25 and torch.equal(out["w"], torch.ones(2))


def test_stock_zstandard_checkpoint_of_compressible_data_loads_exactly(tmp_path):
    from torch.distributed.checkpoint._extension import ZStandard

    state = {"zeros": torch.zeros(60_000), "r": torch.arange(1000.0), "nested": {"step": 3, "name": "x" * 5000}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "z", _extensions=[ZStandard()]), no_dist=True)
    metadata = DataStatesReader(tmp_path / "z").read_metadata()
    (record,) = [i for k, i in metadata.storage_data.items() if k.fqn == "zeros"]
    assert record.transform_descriptors == ["stream.zstd/1"] and record.length < 240_000 // 100
    assert {type(k) for k in metadata.storage_data} == {MetadataIndex}
    out = {"zeros": torch.ones(60_000), "r": torch.zeros(1000), "nested": {"step": 0, "name": ""}}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "z"), no_dist=True)
    assert torch.equal(out["zeros"], state["zeros"]) and torch.equal(out["r"], state["r"]) and out["nested"] == state["nested"]
    # the bound still holds, against what the compressed length can decode to
    metadata = pickle.loads((tmp_path / "z" / ".metadata").read_bytes())
    metadata.state_dict_metadata["zeros"].size = torch.Size([2**40])
    metadata.state_dict_metadata["zeros"].chunks[0].sizes = torch.Size([2**40])
    (tmp_path / "z" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CorruptCheckpointError, match=r"holds 4398046511104 bytes of data but its record in __0_0\.distcp "
                       rf"is only {record.length} bytes \(stream-transformed: at most {record.length * 65536} decoded\)"):
        read_checkpoint_metadata(tmp_path / "z", trust=False)


def test_a_stream_transform_cannot_inflate_past_its_bound(tmp_path, monkeypatch):
    """The decoder stops at the bound (here lowered to 2 bytes per stored byte, which zeros exceed at once)."""
    from torch.distributed.checkpoint._extension import ZStandard

    from dcp_datastates import deliver

    dcp.save({"zeros": torch.zeros(60_000)}, storage_writer=dcp.FileSystemWriter(tmp_path / "z", _extensions=[ZStandard()]),
             no_dist=True)
    monkeypatch.setattr(deliver, "MAX_TRANSFORM_RATIO", 2)
    failure = load_failure(tmp_path / "z", {"zeros": torch.ones(60_000)})
    assert isinstance(failure, CorruptCheckpointError), repr(failure)
    assert "record of 'zeros' in __0_0.distcp at offset 0: its stream transform ['stream.zstd/1'] decodes" in str(failure)
    assert "to more than" in str(failure) and "(at most 2 per stored byte)" in str(failure)


# -- MetadataIndex ---------------------------------------------------------------------------------
def test_storage_keys_hash_with_a_secret_while_unpickled():
    """DCP's own MetadataIndex hash is the attacker's to choose; the one used inside the unpickler is not."""
    from dcp_datastates.safe_pickle import _allowed

    keyed = _allowed()["torch.distributed.checkpoint.metadata", "MetadataIndex"]
    offsets = hp.colliding_pairs(2000)
    assert len({hash(MetadataIndex("w", p)) for p in offsets}) == 1
    assert len({hash(keyed("w", p)) for p in offsets}) > 1990
    assert keyed is not MetadataIndex and issubclass(keyed, MetadataIndex)


def test_the_unpickler_meets_exactly_the_names_the_scan_resolved(real_metadata):
    """(the scan decides what may be changed from the names it read: the unpickler must read the same ones)"""
    from dcp_datastates.safe_pickle import _MetadataUnpickler

    load_metadata_bytes(real_metadata, "x/.metadata", trust=False)  # fills the allowlist
    with pytest.raises(CorruptCheckpointError, match=r"x/\.metadata is damaged: its pickle names "
                       r"torch\.distributed\.checkpoint\.metadata\.Metadata where the scan read another name"):
        _MetadataUnpickler(io.BytesIO(real_metadata), "x/.metadata", [("torch", "Size")]).load()


def test_keyed_metadata_index_never_leaves_a_load(tmp_path, real_metadata):
    metadata = load_metadata_bytes(real_metadata, "x/.metadata", trust=False)
    assert {type(k) for k in metadata.storage_data} == {MetadataIndex}
    assert metadata.storage_data[MetadataIndex("w", [0])].length > 0
    hidden = pickle.loads(real_metadata)
    hidden.planner_data["w"] = (MetadataIndex("w"),)  # unpickled as the keyed subclass, and refused there
    ckpt = save(tmp_path / "c")
    (ckpt / ".metadata").write_bytes(pickle.dumps(hidden, protocol=4))
    with pytest.raises(CorruptCheckpointError, match=r"planner_data holds a _KeyedIndex; only plain data is allowed there"):
        read_checkpoint_metadata(ckpt, trust=False)
    # a key changed after it went into storage_data (its offset a list: unhashable, or a tuple that costs 2**60 to hash)
    key = hp.stack_global(hp.METADATA, "MetadataIndex") + b")\x81}" + hp.ustr("fqn") + hp.ustr("w") + b"sbq\x05"
    changed = (b"\x80\x04" + hp.stack_global(hp.METADATA, "Metadata") + b")\x81}" + hp.ustr("state_dict_metadata") + b"}s"
               + hp.ustr("storage_data") + b"}" + key + b"Nssb" + b"h\x05}" + hp.ustr("offset") + b"]sb0.")
    with pytest.raises(CorruptCheckpointError, match="a storage_data key is not a state-dict key with a torch.Size offset"):
        load_metadata_bytes(changed, "x/.metadata", trust=False)


# -- inspect and verify ----------------------------------------------------------------------------
def _object_checkpoint(path: Path, records: int) -> Path:
    """``records`` 512-byte object records in one data file, with a side file whose every 512-byte block is wrong."""
    path.mkdir()
    (path / "__0_ab_1.distcp").write_bytes(bytes(512 * records))
    (path / ".metadata").write_bytes(honest_metadata(records, 512))
    blocks = records
    side = {"algorithm": "xxh64", "files": {"__0_ab_1.distcp": {"size": 512 * records, "block_bytes": 512,
                                                                 "blocks": ["0123456789abcdef"] * blocks}}}
    (path / "__0_ab_checksums.json").write_text(json.dumps(side))
    return path


def test_inspect_and_verify_are_linear_in_object_records(tmp_path):
    timings = {}
    for n in (2_000, 20_000):
        ckpt = _object_checkpoint(tmp_path / str(n), n)
        start = time.perf_counter()
        info = describe(read_checkpoint_metadata(ckpt, trust=False))
        json.dumps(info)
        report = verify_checkpoint(ckpt)
        timings[n] = time.perf_counter() - start
        assert info["totals"]["objects"] == n and all(e["bytes"] == 512 for e in info["entries"])
        assert report.status == "damaged" and len(report.problems) == n
        first, last = report.problems[0], report.problems[-1]
        assert (first.file, first.offset, first.length, first.keys) == ("__0_ab_1.distcp", 0, 512, ["k0"])
        assert (last.offset, last.keys) == (512 * (n - 1), [f"k{n - 1}"])
    # 10x the records may cost at most ~25x the time (linear plus noise on a shared 2-core machine); the
    # quadratic describe took 95 s for 20k objects, naming the keys of 20k bad blocks one by one ~60 s
    assert timings[20_000] < 25 * timings[2_000] + 1.0, timings



def test_the_safe_loading_guide_examples_run():
    """Every ```python block of docs/safe-loading.md, as a script."""
    text = (Path(__file__).parent.parent / "docs" / "safe-loading.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/safe-loading.md", "exec"), {"__name__": "__main__"})
