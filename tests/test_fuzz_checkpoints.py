"""Fuzzing real checkpoints (issue 12): every load returns exactly what was saved or raises our error.

Hypothesis mutates a real small checkpoint -- its ``.metadata`` pickle (byte flips, opcode
and length-field rewrites, hostile globals), its checksum JSON (sealed and unsealed), and
its data bytes -- then loads it through ``dcp.load`` with our reader (a user's state dict)
or through the convert path (a state rebuilt from the metadata alone, which sizes tensors
from it). For every example:

- the load returns values equal to the saved ones, or raises a ``DataStatesError`` (for
  ``dcp.load``: DCP's ``CheckpointException`` whose every failure is one of ours);
- it finishes within :data:`TIME_LIMIT_S` (run on a daemon thread, so a hang fails the test
  instead of hanging it);
- a marker file that hostile payloads try to create never appears;
- no path outside the checkpoint directory is opened (audit hook on ``open``), apart from
  Python's own module files.

Two generators aim at the unpickler itself (``hostile_pickles``): programs that reach a shared
object (an enum member, a class, a layout, a dtype; through GLOBAL, STACK_GLOBAL, the memo, OBJ,
INST, REDUCE, NEWOBJ, NEWOBJ_EX) and rewrite it (BUILD, SETITEM(S), APPEND(S), ADDITEMS), or
call a registered copyreg extension (EXT1/2/4), in ``.metadata`` and in object records; and
dicts and sets of keys with equal hashes (complex, int pairs, floats, ``torch.Size``, nested
tuples, frozensets, ``MetadataIndex`` offsets). Each must be one of our errors, and the
process state (DCP's enums, torch's dtypes, copyreg's registry, ``sys.modules``) unchanged.

Counters of outcomes per mutation kind are asserted at the end and printed (``-s``) for the
README's reliability table. Derandomized, so CI runs the same examples every time.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException

import dcp_datastates
import dcp_datastates.kernels
import hostile_pickles as hp
from conftest import small_config
from dcp_datastates import DataStatesError, DataStatesReader, DataStatesWriter
from dcp_datastates.cli import load_full_state
from dcp_datastates.metadata_check import INTEGRITY_ATTR

TIME_LIMIT_S = 30.0
SAVED = {
    "w": torch.arange(1500, dtype=torch.float32) / 7,
    "b": torch.arange(9, dtype=torch.int64) - 4,
    "nested": {"t": torch.linspace(0, 1, 33, dtype=torch.float64), "name": "run-3"},
    "step": 42,
}
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
COUNTS: dict[str, Counter] = {}


# -- opens outside the checkpoint: an audit hook, active only during a load --------------------------
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)
# Python's own files and our package's (numba's kernel cache lives beside the kernels)
_PYTHON_ROOTS = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)} | {
    os.path.realpath(os.path.dirname(m.__file__)) + os.sep for m in (dcp_datastates, dcp_datastates.kernels)})


def _outside(opened: list[str], checkpoint: Path) -> list[str]:
    inside = str(checkpoint.resolve()) + os.sep
    return [p for p in opened
            if not os.path.realpath(p).startswith(inside)
            and not os.path.realpath(p).startswith(_PYTHON_ROOTS) and not p.endswith((".py", ".pyc", ".so"))]


# -- the checkpoints under test ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz_originals")
    sealed = root / "sealed"
    dcp.save(SAVED, storage_writer=DataStatesWriter(sealed, small_config("threads")), no_dist=True)
    legacy = root / "legacy"  # as older versions of ours wrote it: side files, no seal in .metadata
    shutil.copytree(sealed, legacy)
    metadata = pickle.loads((legacy / ".metadata").read_bytes())
    vars(metadata).pop(INTEGRITY_ATTR)
    (legacy / ".metadata").write_bytes(pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL))
    return {"sealed": sealed, "legacy": legacy}


def _zeros() -> dict:
    return {"w": torch.zeros(1500), "b": torch.zeros(9, dtype=torch.int64),
            "nested": {"t": torch.zeros(33, dtype=torch.float64), "name": ""}, "step": 0}


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _load(path: Path, rebuild: bool) -> dict:
    if rebuild:  # the convert path: DCP's planner builds every tensor from sizes in .metadata
        return load_full_state(str(path), trust=False)
    out = _zeros()
    dcp.load(out, storage_reader=DataStatesReader(path), no_dist=True)
    return out


def _ours(exc: BaseException) -> bool:
    if isinstance(exc, CheckpointException):
        return bool(exc.failures) and all(
            isinstance(f[0] if isinstance(f, tuple) else f, DataStatesError) for f in exc.failures.values())
    return isinstance(exc, DataStatesError)


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, CheckpointException):
        first = next(iter(exc.failures.values()))
        exc = first[0] if isinstance(first, tuple) else first
    return type(exc).__name__


def check_load(kind: str, work: Path, rebuild: bool) -> str:
    """Load ``work`` on a daemon thread; assert the promise; count and return the outcome."""
    global _OPENED
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["state"] = _load(work, rebuild)
        except BaseException as exc:  # noqa: BLE001 - classified below
            result["error"] = exc

    opened: list[str] = []
    _OPENED = opened
    try:
        thread = threading.Thread(target=run, daemon=True)
        start = time.perf_counter()
        thread.start()
        thread.join(TIME_LIMIT_S)
        seconds = time.perf_counter() - start
    finally:
        _OPENED = None
    assert not thread.is_alive(), f"{kind}: the load ran past {TIME_LIMIT_S} s"
    assert not (work.parent / "marker").exists(), f"{kind}: a planted command ran"
    assert not _outside(opened, work), f"{kind}: opened outside the checkpoint: {_outside(opened, work)}"
    if "error" in result:
        exc = result["error"]
        assert _ours(exc), f"{kind}: not one of our errors: {exc!r}"
        outcome = _error_name(exc)
    else:
        assert _equal(result["state"], SAVED), f"{kind}: loaded values differ from the saved ones"
        outcome = "exact"
    COUNTS.setdefault(kind, Counter())[outcome] += 1
    COUNTS[kind]["max_seconds_x1000"] = max(COUNTS[kind]["max_seconds_x1000"], int(seconds * 1000))
    return outcome


def fresh_copy(original: Path, tmp: Path) -> Path:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / "outside").mkdir()  # a sibling a hostile path could point at
    shutil.copy(next(original.glob("*_0.distcp")), tmp / "outside" / "stolen_0.distcp")
    work = tmp / "ckpt"
    shutil.copytree(original, work)
    return work


# -- .metadata ---------------------------------------------------------------------------------
def _opcodes(data: bytes) -> list[tuple[int, str, int]]:
    """(position, name, argument length) of every opcode."""
    ops = list(pickletools.genops(data))
    out = []
    for k, (op, _, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(data)
        out.append((pos, op.name, end - pos - 1))
    return out


@given(data=st.data())
@settings(FUZZ, max_examples=250)
def test_fuzz_metadata_bytes(originals, tmp_path, data):
    work = fresh_copy(originals["sealed"], tmp_path / "x")
    raw = bytearray((work / ".metadata").read_bytes())
    how = data.draw(st.sampled_from(["flip", "opcode", "length", "truncate"]))
    ops = _opcodes(bytes(raw))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] ^= data.draw(st.integers(1, 255))
    elif how == "opcode":
        pos, _, _ = data.draw(st.sampled_from(ops))
        raw[pos] = data.draw(st.sampled_from(sorted({ord(o.code) for o in pickletools.opcodes})))
    elif how == "length":  # a length or integer field set to a boundary value
        candidates = [(p, n) for p, name, n in ops if n in (1, 2, 4, 8) and name not in ("PROTO",)]
        pos, width = data.draw(st.sampled_from(candidates))
        value = data.draw(st.sampled_from([0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), 2**(8 * width - 1) - 1]))
        raw[pos + 1 : pos + 1 + width] = value.to_bytes(width, "little")
    else:
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    (work / ".metadata").write_bytes(bytes(raw))
    check_load(f"metadata:{how}", work, rebuild=data.draw(st.booleans()))


HOSTILE_GLOBALS = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
                   ("subprocess", "Popen"), ("torch.distributed.checkpoint.metadata", "os.system"),
                   ("torch.distributed.checkpoint.metadata", "torch.load"), ("pathlib", "Path.touch"),
                   ("builtins", "getattr"), ("torch", "load"), ("torch.serialization", "load"),
                   ("shutil", "rmtree"), ("importlib", "import_module"), ("builtins", "__import__")]


def _frameless(path: Path) -> tuple[bytes, list[bytes]]:
    """``.metadata`` re-pickled without frames (protocol 2, raised to 4 so dotted names resolve), and its GLOBALs."""
    metadata = pickle.loads((path / ".metadata").read_bytes())
    data = pickle.dumps(metadata, protocol=2).replace(b"\x80\x02", b"\x80\x04", 1)
    return data, sorted({data[p : p + 1 + n] for p, name, n in _opcodes(data) if name == "GLOBAL"})


@given(data=st.data())
@settings(FUZZ, max_examples=50)
def test_fuzz_metadata_globals(originals, tmp_path, data):
    work = fresh_copy(originals["sealed"], tmp_path / "x")
    frameless, globals_ = _frameless(work)
    victim = data.draw(st.sampled_from(globals_))
    module, name = data.draw(st.sampled_from(HOSTILE_GLOBALS))
    hostile = f"c{module}\n{name}\n".encode()
    if data.draw(st.booleans()):  # also call it, first thing, with a command that leaves the marker
        command = f"touch {work.parent / 'marker'}".encode()
        call = hostile + b"X" + len(command).to_bytes(4, "little") + command + b"\x85R0"
        frameless = frameless.replace(b"\x80\x04", b"\x80\x04" + call, 1)
    (work / ".metadata").write_bytes(frameless.replace(victim, hostile, 1))
    assert check_load("metadata:hostile-global", work, rebuild=data.draw(st.booleans())) == "UnsafeCheckpointError"


# -- checksum JSON -----------------------------------------------------------------------------
@given(data=st.data())
@settings(FUZZ, max_examples=120)
def test_fuzz_checksum_json(originals, tmp_path, data):
    flavour = data.draw(st.sampled_from(["sealed", "legacy"]))
    work = fresh_copy(originals[flavour], tmp_path / "x")
    (side,) = work.glob("*_checksums.json")
    text = side.read_text()
    how = data.draw(st.sampled_from(["flip", "number", "drop-key", "truncate", "delete"]))
    if how == "flip":
        raw = bytearray(text.encode())
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 127))
        side.write_bytes(bytes(raw))
    elif how == "number":
        document = json.loads(text)
        entry = data.draw(st.sampled_from(sorted(document["files"])))
        field = data.draw(st.sampled_from(["size", "block_bytes"]))
        values = [-4096, -1, 0, 1, 3000, 4096, 8192, 2**20, 2**62, 2**64, 1e300, "8192", None, [], {}]
        current = document["files"][entry][field]  # never the value it has: that would change nothing
        document["files"][entry][field] = data.draw(st.sampled_from(
            [v for v in values if not (type(v) is type(current) and v == current)]))
        side.write_text(json.dumps(document))
    elif how == "drop-key":
        document = json.loads(text)
        entry = data.draw(st.sampled_from(sorted(document["files"])))
        if data.draw(st.booleans()):
            del document["files"][entry]
        else:
            del document["files"][entry][data.draw(st.sampled_from(["size", "block_bytes", "blocks"]))]
        side.write_text(json.dumps(document))
    elif how == "truncate":
        side.write_text(text[: data.draw(st.integers(0, len(text) - 1))])
    else:
        side.unlink()
    outcome = check_load(f"checksums:{flavour}:{how}", work, rebuild=data.draw(st.booleans()))
    if flavour == "sealed":  # the seal makes any change or removal an error
        assert outcome in ("ChecksumMismatchError", "CorruptCheckpointError"), outcome


# -- data bytes --------------------------------------------------------------------------------
@given(data=st.data())
@settings(FUZZ, max_examples=120)
def test_fuzz_data_bytes(originals, tmp_path, data):
    work = fresh_copy(originals["sealed"], tmp_path / "x")
    target = data.draw(st.sampled_from(sorted(p.name for p in work.glob("*.distcp"))))
    path = work / target
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "append", "zero-block"]))
    if how == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    elif how == "append":
        raw += bytes(data.draw(st.integers(1, 9000)))
    else:
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at : at + 4096] = bytes(len(raw[at : at + 4096]))
        if bytes(raw) == path.read_bytes():
            raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    outcome = check_load(f"data:{how}", work, rebuild=data.draw(st.booleans()))
    assert outcome != "exact", "a changed data byte loaded silently"


# -- hostile opcodes and hash collisions --------------------------------------------------------------
@pytest.fixture(scope="module")
def warmed(originals, tmp_path_factory) -> None:
    """One honest load of each kind first: the imports a first load makes are no change of process state."""
    work = fresh_copy(originals["sealed"], tmp_path_factory.mktemp("warm"))
    for rebuild in (False, True):
        _load(work, rebuild)
    hp.put_object_record(work, "step", hp.object_record(hp.whole(hp.fragment(42, 2), 2)))
    assert _load(work, rebuild=False)["step"] == 42


def check_hostile(kind: str, work: Path, rebuild: bool) -> None:
    before = hp.process_state()
    outcome = check_load(kind, work, rebuild)
    assert outcome in ("CorruptCheckpointError", "UnsafeCheckpointError"), f"{kind}: {outcome}"
    assert hp.process_state() == before, f"{kind}: the load changed process state"


@given(data=st.data())
@settings(FUZZ, max_examples=40)
def test_fuzz_hostile_opcodes(originals, warmed, tmp_path, data):
    work = fresh_copy(originals["sealed"], tmp_path / "x")
    command = f"touch {work.parent / 'marker'}"
    target = data.draw(st.sampled_from([".metadata", "object record"]))
    routes = hp.shared_routes() if target == ".metadata" else hp.object_record_routes()
    route = data.draw(st.sampled_from(sorted(routes) + sorted(hp.EXT_CODES)))
    if target == ".metadata":
        real = hp.frameless(pickle.loads((work / ".metadata").read_bytes()))
        if route in hp.EXT_CODES:
            how, hostile = route, real[:2] + hp.ext_call(route, command) + real[2:]
        else:
            how = data.draw(st.sampled_from(sorted(hp.mutations())))
            hostile = hp.hostile_metadata(real, route, how)
        (work / ".metadata").write_bytes(hostile)
    else:
        if route in hp.EXT_CODES:
            how, program = route, hp.ext_call(route, command) + b"N"
        else:
            how = data.draw(st.sampled_from(hp.OBJECT_RECORD_MUTATIONS))
            program = routes[route] + hp.mutations(hp.xstr)[how]
        hp.put_object_record(work, "step", hp.object_record(hp.whole(program, 2)))
    with hp.registered_extension(), torch.serialization.safe_globals([hp.Shade]):
        check_hostile(f"opcodes:{target}:{how}", work, rebuild=data.draw(st.booleans()))


@given(data=st.data())
@settings(FUZZ, max_examples=30)
def test_fuzz_hash_collisions(originals, warmed, tmp_path, data):
    work = fresh_copy(originals["sealed"], tmp_path / "x")
    where = data.draw(st.sampled_from(["planner_data", "a Metadata field", "storage_data", "object record"]))
    kind = data.draw(st.sampled_from(sorted(hp.COLLIDING)))
    items = hp.COLLIDING[kind](data.draw(st.integers(17, 400)))
    as_set = data.draw(st.booleans())
    if where == "object record":
        program = hp.set_by_call(items) if as_set else hp.dict_of(items, 2)
        hp.put_object_record(work, "step", hp.object_record(hp.whole(program, 2)))
    elif where == "storage_data":
        kind = "MetadataIndex offsets"
        (work / ".metadata").write_bytes(hp.colliding_storage_metadata(len(items)))
    else:
        metadata = pickle.loads((work / ".metadata").read_bytes())
        flood = hp._Members(items) if as_set else hp._Pairs([(k, None) for k in items])
        if where == "planner_data":
            metadata.planner_data["flood"] = flood
        else:
            metadata.flood = flood
        (work / ".metadata").write_bytes(hp.metadata_pickle(metadata))
    check_hostile(f"collisions:{where}:{kind}", work, rebuild=data.draw(st.booleans()))


# -- the counters --------------------------------------------------------------------------------
def test_fuzz_counters_add_up():
    """Runs after the fuzz tests in this module (pytest keeps file order): every kind ran and was judged."""
    if not COUNTS:
        pytest.fail("run this module as a whole: the fuzz tests above fill the counters")
    totals = Counter()
    for kind, counter in sorted(COUNTS.items()):
        group = kind.split(":")[0]
        totals[group] += sum(v for k, v in counter.items() if k != "max_seconds_x1000")
        assert counter["max_seconds_x1000"] < TIME_LIMIT_S * 1000
    print("\nfuzz outcomes:", json.dumps({k: dict(v) for k, v in sorted(COUNTS.items())}, indent=1))
    print("fuzz totals:", dict(totals))
    assert totals == {"metadata": 300, "checksums": 120, "data": 120, "opcodes": 40, "collisions": 30}, totals
    for kind, counter in COUNTS.items():  # every hostile program and every flood: one of our errors
        if kind.startswith(("opcodes:", "collisions:")):
            assert set(counter) <= {"CorruptCheckpointError", "UnsafeCheckpointError", "max_seconds_x1000"}, (kind, counter)
    hostile = COUNTS["metadata:hostile-global"]
    assert hostile["UnsafeCheckpointError"] == 50 and set(hostile) == {"UnsafeCheckpointError", "max_seconds_x1000"}
    data_errors = sum(v for kind, c in COUNTS.items() if kind.startswith("data:") for k, v in c.items()
                      if k not in ("exact", "max_seconds_x1000"))
    assert data_errors == totals["data"]
    flips = COUNTS.get("metadata:flip", Counter())
    assert sum(v for k, v in flips.items() if k not in ("exact", "max_seconds_x1000")) > 0  # flips are caught
