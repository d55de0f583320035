"""Hostile pickles for the safe-loading tests: programs that change shared objects, EXT codes, hash floods.

Built opcode by opcode (never by pickling the hostile object itself: a set of 40k colliding
values takes minutes to build), so each test states exactly which route it takes. Shared
by ``tests/test_safe_unpickling.py`` (each case by hand, big inputs, time bounds) and the
seeded generators of ``tests/test_fuzz_checkpoints.py``.
"""

from __future__ import annotations

import copyreg
import enum
import io
import pickle
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner

PLANNER, METADATA = "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint.metadata"


class Shade(enum.Enum):
    """A user's enum, admitted to object records with ``torch.serialization.safe_globals([Shade])``."""

    LIGHT = 1
    DARK = 2


# -- process state a load must not change --------------------------------------------------------
def process_state() -> dict[str, Any]:
    """What a hostile pickle would like to change: DCP's enums, torch's dtypes, copyreg, modules, classes."""
    enums = {}
    for kind in (dcp_planner.WriteItemType, dcp_planner.LoadItemType, dcp_metadata._MEM_FORMAT_ENCODING, Shade):
        enums[kind.__name__] = ([(m._name_, m._value_, id(m), dict(vars(m))) for m in kind],
                                dict(kind._member_map_), dict(kind._value2member_map_))
    classes = {cls.__name__: dict(vars(cls)) for cls in (
        dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.TensorProperties,
        dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata)}
    return {
        "enums": enums,
        "classes": classes,
        "torch": {name: (id(v), str(v)) for name, v in vars(torch).items()
                  if isinstance(v, (torch.dtype, torch.layout, torch.memory_format))},
        "copyreg": (dict(copyreg._extension_registry), dict(copyreg._inverted_registry), dict(copyreg._extension_cache)),
        "modules": sorted(sys.modules),
    }


# -- pieces of pickles ---------------------------------------------------------------------------
def ustr(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"X" + len(raw).to_bytes(4, "little") + raw


def xstr(text: str) -> bytes:
    """BINUNICODE: the string opcode of protocol 2, the only one torch's weights-only unpickler reads."""
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def fragment(obj: object, protocol: int = 3) -> bytes:
    """``obj`` as opcodes without memo, PROTO or STOP: fragments concatenate into one valid pickle."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=protocol)
    pickler.fast = True  # no memo: indexes would clash between fragments
    pickler.dump(obj)
    data = buffer.getvalue()
    assert data[:1] == b"\x80" and data[-1:] == b"."
    return data[2:-1]


def text_global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def stack_global(module: str, name: str, memo: bool = False) -> bytes:
    """STACK_GLOBAL from two strings; with ``memo`` the strings take a detour through the memo (PUT/GET)."""
    if not memo:
        return ustr(module) + ustr(name) + b"\x93"
    return ustr(module) + b"q\x01" + b"0" + ustr(name) + b"q\x02" + b"0" + b"h\x01h\x02\x93"


# -- routes to an object the pickle did not create ---------------------------------------------------
#: Each route leaves one shared object on the stack: an enum member an allowlisted call returned, a
#: class, a layout or a dtype -- objects every later save of the process uses.
def shared_routes() -> dict[str, bytes]:
    member = b"K\x01\x85"  # (1,)
    return {
        "REDUCE(GLOBAL enum)": text_global(PLANNER, "WriteItemType") + member + b"R",
        "REDUCE(STACK_GLOBAL enum)": stack_global(PLANNER, "WriteItemType") + member + b"R",
        "REDUCE(STACK_GLOBAL via memo)": stack_global(METADATA, "_MEM_FORMAT_ENCODING", memo=True) + b"K\x00\x85R",
        "OBJ(enum)": b"(" + text_global(PLANNER, "LoadItemType") + b"K\x01o",
        "INST(enum)": b"(K\x01" + f"i{PLANNER}\nWriteItemType\n".encode(),
        "NEWOBJ(enum)": stack_global(PLANNER, "LoadItemType") + member + b"\x81",
        "NEWOBJ_EX(enum)": stack_global(PLANNER, "WriteItemType") + member + b"}\x92",
        "GLOBAL class": text_global(METADATA, "Metadata"),
        "GLOBAL dtype": stack_global("torch", "float32"),
        "REDUCE(layout)": text_global("torch.serialization", "_get_layout") + ustr("torch.strided") + b"\x85R",
        "memo copy of an enum member": text_global(PLANNER, "WriteItemType") + member + b"R" + b"q\x07" + b"0" + b"h\x07",
        "DUP of an enum member": text_global(PLANNER, "LoadItemType") + member + b"R" + b"2" + b"0",
    }


def object_record_routes() -> dict[str, bytes]:
    """Routes torch's weights-only unpickler (GLOBAL, REDUCE, NEWOBJ only) would take to a shared object."""
    shade = text_global(__name__, "Shade")
    return {
        "REDUCE(user enum)": shade + b"K\x01\x85R",
        "NEWOBJ(user enum)": shade + b"K\x02\x85\x81",
        "memo copy of a user enum member": b"]" + shade + b"K\x01\x85R" + b"q\x03a" + b"h\x03",  # (no POP in torch's)
        "REDUCE(layout)": text_global("torch.serialization", "_get_layout") + xstr("torch.strided") + b"\x85R",
        "GLOBAL dtype": text_global("torch", "float32"),
        "GLOBAL class": text_global("collections", "OrderedDict"),
    }


#: what torch's weights-only unpickler supports of ``mutations()``
OBJECT_RECORD_MUTATIONS = ("BUILD dict", "BUILD slots", "SETITEM", "SETITEMS", "APPEND", "APPENDS")


def mutations(text: Callable[[str], bytes] = ustr) -> dict[str, bytes]:
    """Opcodes that change the object on top of the stack (it stays there); ``text`` writes their strings."""
    rename = b"}" + text("_name_") + text("PWNED") + b"s"
    return {
        "BUILD dict": rename + b"b",
        "BUILD slots": b"N" + rename + b"\x86b",
        "SETITEM": text("_name_") + text("PWNED") + b"s",
        "SETITEMS": b"(" + text("_name_") + text("PWNED") + b"u",
        "APPEND": text("x") + b"a",
        "APPENDS": b"(" + text("x") + b"e",
        "ADDITEMS": b"(" + text("x") + b"\x90",
    }


def hostile_metadata(real: bytes, route: str, mutation: str) -> bytes:
    """A real ``.metadata`` (protocol 2+, frames removed) with the hostile program run first, its result popped."""
    assert real[:1] == b"\x80"
    return real[:2] + shared_routes()[route] + mutations()[mutation] + b"0" + real[2:]


def frameless(metadata: object) -> bytes:
    """``metadata`` pickled without frames or memo opcodes that a prefix could disturb (protocol 2, marked 4)."""
    return pickle.dumps(metadata, protocol=2).replace(b"\x80\x02", b"\x80\x04", 1)


# -- EXT opcodes -----------------------------------------------------------------------------------
EXT_CODES = {"EXT1": 0xF1, "EXT2": 0x1234, "EXT4": 0x7FFF0001}
#: one registered name per code (copyreg allows one code per name); the cache maps each to os.system
_EXT_NAMES = {"EXT1": ("os", "system"), "EXT2": ("posix", "system"), "EXT4": ("subprocess", "getoutput")}


def ext_opcode(kind: str) -> bytes:
    opcode, width = {"EXT1": (b"\x82", 1), "EXT2": (b"\x83", 2), "EXT4": (b"\x84", 4)}[kind]
    return opcode + EXT_CODES[kind].to_bytes(width, "little")


def ext_call(kind: str, command: str) -> bytes:
    """Resolve the extension, call it with ``command``, drop the result."""
    return ext_opcode(kind) + ustr(command) + b"\x85R0"


class registered_extension:
    """``os.system`` registered under the EXT codes -- and in copyreg's cache, as an earlier plain load leaves it."""

    def __enter__(self) -> registered_extension:
        import os

        for kind, code in EXT_CODES.items():
            copyreg.add_extension(*_EXT_NAMES[kind], code)
            copyreg._extension_cache[code] = os.system
        return self

    def __exit__(self, *exc: object) -> None:
        for kind, code in EXT_CODES.items():
            copyreg.remove_extension(*_EXT_NAMES[kind], code)  # also clears the cache entry


# -- hash collisions -----------------------------------------------------------------------------------
_M = (1 << 64) - 1
_P1, _P2, _P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261
_INV1, _INV2 = pow(_P1, -1, 1 << 64), pow(_P2, -1, 1 << 64)
_MOD = sys.hash_info.modulus


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def colliding_pairs(count: int, target: int = 12345, start: int = 1) -> list[tuple[int, int]]:
    """``count`` distinct 2-tuples of 64-bit ints, all hashing to ``target`` (CPython's tuple hash inverted)."""
    final = (target - (2 ^ (_P5 ^ 3527539))) & _M
    x = _rotl((final * _INV1) & _M, 64 - 31)
    out: list[tuple[int, int]] = []
    a = start
    while len(out) < count:
        acc = _rotl((_P5 + (hash(a) & _M) * _P2) & _M, 31) * _P1 & _M
        hb = ((x - acc) * _INV2) & _M
        hb = hb - (1 << 64) if hb >> 63 else hb
        if -_MOD < hb < _MOD and hb != -1:
            out.append((a, hb))
        a += 1
    return out


def colliding_complex(count: int) -> list[complex]:
    """hash(k * 1000003 + (-k)j) == 0 for every k."""
    return [complex(k * 1000003.0, -float(k)) for k in range(1, count + 1)]


def colliding_floats() -> list[float]:
    """Floats hashing alike: 2**(61 j) is 1 modulo 2**61 - 1 (34 of them, more than the limit of 16)."""
    return [7.0 * 2.0 ** (61 * j) for j in range(-17, 17)]


def colliding_big_ints(count: int) -> list[int]:
    """Integers beyond 64 bits hashing alike (object records admit them)."""
    return [5 + k * _MOD for k in range(1, count + 1)]


COLLIDING = {
    "complex": lambda n: colliding_complex(n),
    "int pairs": lambda n: colliding_pairs(n),
    "floats": lambda n: colliding_floats(),
    "torch.Size": lambda n: [torch.Size(p) for p in colliding_pairs(n)],
    "nested tuples": lambda n: [(p, "s") for p in colliding_pairs(n)],
    "frozensets": lambda n: [frozenset({p}) for p in colliding_pairs(n)],
}


def complex_set(values: Iterable[complex]) -> bytes:
    """A set of complex numbers as compactly as a pickler writes it (22 bytes each: the global memoized)."""
    import struct

    calls = b"".join(b"h\x01G" + struct.pack(">d", v.real) + b"G" + struct.pack(">d", v.imag) + b"\x86R" for v in values)
    return text_global("builtins", "complex") + b"q\x010" + b"\x8f(" + calls + b"\x90"


def set_of(items: Iterable[object], protocol: int = 3) -> bytes:
    """Opcodes of a set of ``items`` (EMPTY_SET + ADDITEMS), built without hashing them here."""
    return b"\x8f(" + b"".join(fragment(x, protocol) for x in items) + b"\x90"


def set_by_call(items: Iterable[object], protocol: int = 2) -> bytes:
    """``builtins.set([...])``: how protocol 2 (``torch.save``) writes a set."""
    return text_global("builtins", "set") + b"](" + b"".join(fragment(x, protocol) for x in items) + b"e\x85R"


def dict_of(keys: Iterable[object], protocol: int = 3) -> bytes:
    """Opcodes of ``{key: None}`` for each key (EMPTY_DICT + SETITEMS)."""
    return b"}(" + b"".join(fragment(k, protocol) + b"N" for k in keys) + b"u"


def whole(program: bytes, protocol: int = 3) -> bytes:
    return b"\x80" + bytes([protocol]) + program + b"."


class _Members:
    """Stands for a set while pickling: written as ``set([...])`` without hashing its members here."""

    def __init__(self, members: list[object]) -> None:
        self.members = members


class _Pairs:
    """Stands for a dict while pickling: written as ``dict()`` + SETITEMS without hashing its keys here."""

    def __init__(self, pairs: list[tuple[object, object]]) -> None:
        self.pairs = pairs


class _PairsPickler(pickle.Pickler):
    def reducer_override(self, obj: object) -> Any:
        if type(obj) is _Pairs:
            return (dict, (), None, None, iter(obj.pairs))
        if type(obj) is _Members:
            return (set, (obj.members,))
        return NotImplemented


def metadata_pickle(metadata: object, protocol: int = 4) -> bytes:
    """Pickle ``metadata`` as DCP does, any ``_Pairs`` / ``_Members`` in it written as dicts / sets."""
    buffer = io.BytesIO()
    _PairsPickler(buffer, protocol=protocol).dump(metadata)
    return buffer.getvalue()


def colliding_storage_metadata(count: int) -> bytes:
    """A real-looking ``.metadata``: one tensor whose ``count`` chunk records' MetadataIndex keys all collide."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata)

    pairs = colliding_pairs(count, start=2**40)  # offsets, all (fqn, offset) hashes equal
    chunks = [ChunkStorageMetadata(torch.Size(p), torch.Size([1, 1])) for p in pairs]
    md = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([2**62, 2**62]), chunks)
    storage = _Pairs([(MetadataIndex("w", p), _StorageInfo("__0_ab_0.distcp", 4 * k, 4)) for k, p in enumerate(pairs)])
    return metadata_pickle(Metadata({"w": md}, planner_data={"w": ("w",)}, storage_data=storage))  # type: ignore[arg-type]


# -- object records ----------------------------------------------------------------------------------
def object_record(data_pkl: bytes) -> bytes:
    """A ``torch.save`` archive whose ``data.pkl`` is ``data_pkl`` (stored members, as torch writes them)."""
    buffer = io.BytesIO()
    torch.save(0, buffer)
    original = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for member in original.namelist():
            archive.writestr(member, data_pkl if member.endswith("data.pkl") else original.read(member))
    return out.getvalue()


def put_object_record(checkpoint: Path, key: str, record: bytes) -> None:
    """Point ``key``'s record of an unsealed checkpoint at ``record`` (appended to its data file).

    The checkpoint is left without checksums (as stock DCP writes them), so the load reaches the
    object record's safety checks instead of stopping at a checksum mismatch.
    """
    from dcp_datastates.metadata_check import INTEGRITY_ATTR

    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
    vars(metadata).pop(INTEGRITY_ATTR, None)
    (info,) = [i for idx, i in metadata.storage_data.items() if idx.fqn == key]
    path = checkpoint / info.relative_path
    info.offset, info.length = path.stat().st_size, len(record)
    with open(path, "ab") as f:
        f.write(record)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL))
    for side in checkpoint.glob("*_checksums.json"):
        side.unlink()
