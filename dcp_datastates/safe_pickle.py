"""Loading pickled checkpoint content without running code from the file.

A DCP checkpoint holds two kinds of pickles: ``.metadata`` (DCP's own dataclasses) and
one pickle per non-tensor object of the state dict. Stock DCP unpickles both with no
restriction, so a planted ``__reduce__`` runs arbitrary code at load time. We load
``.metadata`` in two steps, both on bytes already in memory:

1. **scan** every opcode (checking each length field against the bytes that remain,
   so nothing is allocated from a number in the file) and refuse pickles that could crash or stall the real unpickler:
   tuples nested deeper than :data:`MAX_NESTING` (hashing them recurses in C and
   overflows the stack), integers outside 64 bits (hash-collision floods), memo indexes
   beyond the file's size (the C unpickler allocates a memo table that large), and
   calls that would copy more elements than the file could describe.
2. **unpickle** with ``find_class`` resolving only an explicit list of exact
   ``(module, name)`` pairs. A name with a dot is refused outright: protocol >= 4
   resolves ``"os.system"`` *relative to* an allowed module, which is how a 100-byte
   ``.metadata`` could otherwise reach a shell.

Every object record is checked with ``torch.load(weights_only=True)`` before any planner
unpickles it. Trusting a checkpoint's content is an explicit opt-in
(``trust_checkpoint=True`` / ``--trust``), which restores stock behaviour.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable
from enum import Enum
from collections import OrderedDict
from typing import IO, Any

import torch

from dcp_datastates.errors import ChecksumMismatchError, CorruptCheckpointError, UnsafeCheckpointError

#: Deepest nesting of containers a ``.metadata`` may build (real ones stay below 15).
MAX_NESTING = 100
#: Elements the unpickler may copy in calls (``tuple(x)``, ``BUILD``), per byte of pickle.
_COPY_BUDGET_PER_BYTE = 8

_TRUST_HINT = (
    "If you trust where this checkpoint came from, load it with DataStatesReader(path, trust_checkpoint=True) "
    "(CLI: --trust)."
)


def _path_as_str(*parts: object) -> str:
    """``pathlib.Path`` in ``StorageMeta.checkpoint_id`` becomes a plain string: no object with methods."""
    if not all(isinstance(p, str) for p in parts):
        raise ValueError("a pathlib.Path built from something other than strings")
    return os.path.join(*parts) if parts else "."


def _layout(name: object) -> torch.layout:
    """``torch.serialization._get_layout`` restricted to the layouts torch defines."""
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise ValueError(f"unknown tensor layout {name!r}")
    return layouts[name]


def _enum_lookup(kind: type[Enum]) -> Callable[[object], Enum]:
    """An enum class as a plain function: ``REDUCE`` can look a member up, ``NEWOBJ`` cannot get at it."""

    def lookup(value: object) -> Enum:
        return kind(value)

    return lookup


def _allowed() -> dict[tuple[str, str], Any]:
    """Every global a ``.metadata`` of DCP (ours or stock) may name, as exact pairs."""
    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties"):
        allowed["torch.distributed.checkpoint.metadata", name] = getattr(metadata, name)
    allowed["torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"] = _enum_lookup(metadata._MEM_FORMAT_ENCODING)
    allowed["torch.distributed.checkpoint.filesystem", "_StorageInfo"] = filesystem._StorageInfo
    for name in ("WriteItemType", "LoadItemType"):
        allowed["torch.distributed.checkpoint.planner", name] = _enum_lookup(getattr(planner, name))
    allowed["torch.serialization", "_get_layout"] = _layout
    allowed["torch", "Size"] = torch.Size
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)) and "." not in name:
            allowed["torch", name] = value
    for name in ("Path", "PosixPath", "PurePath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        allowed["pathlib", name] = _path_as_str
    allowed["collections", "OrderedDict"] = OrderedDict
    for kind in (set, frozenset, tuple, list, dict, complex, slice):
        allowed["builtins", kind.__name__] = kind
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed()
        target = _ALLOWED.get((module, name)) if "." not in name else None
        if target is None:
            raise UnsafeCheckpointError(
                f"{self.source} refers to {module}.{name}, which is not a DCP metadata type; refusing to unpickle "
                f"it (it could run code). {_TRUST_HINT}"
            )
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata")


def _corrupt(source: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{source} is damaged: {what}. Restore it from a copy or load another checkpoint."
    )


# Opcode argument shapes (pickle protocols 0-5), for the scanner below.
_FIXED = {ord(c): n for c, n in [("J", 4), ("K", 1), ("M", 2), ("h", 1), ("j", 4), ("q", 1), ("r", 4),
                                 ("\x82", 1), ("\x83", 2), ("\x84", 4), ("\x80", 1), ("\x95", 8), ("G", 8)]}
_COUNTED = {ord(c): (n, signed) for c, n, signed in [
    ("U", 1, False), ("C", 1, False), ("\x8c", 1, False), ("\x8a", 1, False),
    ("T", 4, True), ("B", 4, False), ("X", 4, False), ("\x8b", 4, True),
    ("\x8e", 8, False), ("\x8d", 8, False), ("\x96", 8, False)]}
_LINES = {ord(c): n for c, n in [("I", 1), ("L", 1), ("S", 1), ("V", 1), ("F", 1), ("g", 1), ("p", 1), ("P", 1),
                                 ("c", 2), ("i", 2)]}
_SCALARS = {ord(c) for c in "JKMIL\x8a\x8bSTUBC\x8e\x96\x97NV\x88\x89\x8cX\x8dFGc\x82\x83\x84P"}
_EMPTY = {ord(c) for c in "]}\x8f)"}
_TUPLE_N = {0x85: 1, 0x86: 2, 0x87: 3}
_LEAF = (0, 0, 0)  # immutable values share one cell; containers get their own (mutable) cell
_LEAF_TUPLE = (1, 0, 0)
_ARG_KIND = [1 if op in _FIXED else 2 if op in _COUNTED else 3 if op in _LINES else 0 for op in range(256)]
_IS_SCALAR = [op in _SCALARS for op in range(256)]


def scan_pickle(data: bytes, source: str, *, int_limit: bool = True) -> None:
    """Refuse a pickle the C unpickler could crash, stall or exhaust memory on (see the module docstring).

    A stack machine over the opcodes tracks, per value, ``[nesting, length, inner]``: its
    container depth, its direct element count and its elements' element counts (what a
    call like ``tuple(x)`` copies). Mutable containers share their cell through the memo,
    as the objects do. Linear in the pickle's size, and checks every length field against
    the bytes that remain -- nothing is allocated from a number in the file.
    """
    n = len(data)
    budget = _COPY_BUDGET_PER_BYTE * n + 4096
    stack: list[list[int]] = []
    marks: list[list[list[int]]] = []
    memo: dict[int, list[int]] = {}
    i = pos = 0

    def fail(what: str) -> CorruptCheckpointError:
        return _corrupt(source, f"{what} (byte {pos})")

    def deep(depth: int) -> int:
        if depth > MAX_NESTING:
            raise fail(f"it nests containers more than {MAX_NESTING} levels deep")
        return depth

    def pop_mark() -> list[list[int]]:
        nonlocal stack
        if not marks:
            raise fail("its pickle is malformed: no mark to pop to")
        items, stack = stack, marks.pop()
        return items

    def check_int(value: int) -> None:
        if int_limit and not -(2**63) <= value < 2**63:
            raise fail("an integer does not fit in 64 bits")

    try:
        while True:
            if i >= n:
                raise fail("its pickle ends before its STOP opcode (truncated?)")
            op = data[i]
            # the four most frequent opcodes of DCP metadata, without the general machinery
            if op == 0x94:  # MEMOIZE
                memo[len(memo)] = stack[-1]
                i += 1
                continue
            if op == 0x68:  # BINGET
                stack.append(memo[data[i + 1]])
                i += 2
                continue
            if op == 0x8C:  # SHORT_BINUNICODE
                i += 2 + data[i + 1]
                if i > n:
                    pos = i
                    raise fail("its pickle is truncated inside a string")
                stack.append(_LEAF)
                continue
            if op == 0x29:  # EMPTY_TUPLE
                stack.append(_LEAF_TUPLE)
                i += 1
                continue
            pos = i
            i += 1
            kind = _ARG_KIND[op]
            if kind == 0:
                if op == 0x94:  # MEMOIZE: the most frequent opcode by far
                    memo[len(memo)] = stack[-1]
                    continue
            elif kind == 1:
                width = _FIXED[op]
                if i + width > n:
                    raise fail("its pickle is truncated inside an opcode")
                if width == 1:
                    arg = data[i]
                else:
                    arg = int.from_bytes(data[i : i + width], "little", signed=op == 0x4A or op == 0x84)
                i += width
                if op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
                    stack.append(memo[arg])
                    continue
            elif kind == 2:
                width, signed = _COUNTED[op]
                if i + width > n:
                    raise fail("its pickle is truncated inside a length field")
                length = data[i] if width == 1 else int.from_bytes(data[i : i + width], "little", signed=signed)
                i += width
                if length < 0 or length > n - i:
                    raise fail(f"a length field claims {length} bytes but only {n - i} remain (truncated?)")
                if op == 0x8A or op == 0x8B:
                    check_int(int.from_bytes(data[i : i + length], "little", signed=True) if length <= 9 else 2**64)
                i += length
                stack.append(_LEAF)  # every counted opcode pushes a string, bytes or int
                continue
            else:
                start = i
                for _ in range(_LINES[op]):
                    end = data.find(b"\n", i)
                    if end < 0:
                        raise fail("its pickle is truncated inside a text argument")
                    i = end + 1
                if op in (0x49, 0x4C, 0x67, 0x70):  # INT, LONG, GET, PUT
                    text = data[start : i - 1].rstrip(b"L")
                    if text in (b"00", b"01"):
                        text = text[1:]
                    arg = int(text) if len(text) < 40 or not int_limit else 2**64
                    if op in (0x49, 0x4C):
                        check_int(arg)

            if _IS_SCALAR[op]:
                stack.append(_LEAF)
            elif op == 0x67:  # GET
                stack.append(memo[arg])
            elif op == 0x71 or op == 0x72 or op == 0x70:  # BINPUT, LONG_BINPUT, PUT
                if not 0 <= arg <= i:
                    raise fail(f"memo index {arg} is beyond anything the file could store")
                memo[arg] = stack[-1]
            elif op in _EMPTY:
                stack.append([1, 0, 0])
            elif op == 0x28:  # MARK
                marks.append(stack)
                stack = []
            elif op in _TUPLE_N:
                k = _TUPLE_N[op]
                if len(stack) < k:
                    raise fail("its pickle is malformed: stack underflow")
                items = stack[-k:]
                del stack[-k:]
                stack.append([deep(1 + max(c[0] for c in items)), k, sum(c[1] for c in items)])
            elif op in (0x74, 0x6C, 0x64, 0x91):  # TUPLE, LIST, DICT, FROZENSET
                items = pop_mark()
                stack.append([deep(1 + max((c[0] for c in items), default=0)), len(items), sum(c[1] for c in items)])
            elif op in (0x65, 0x75, 0x90, 0x61, 0x73):  # APPENDS, SETITEMS, ADDITEMS, APPEND, SETITEM
                if op == 0x61:
                    items = [stack.pop()]
                elif op == 0x73:
                    items = [stack.pop(), stack.pop()]
                else:
                    items = pop_mark()
                cell = stack[-1]
                cell[0] = deep(max([cell[0]] + [c[0] + 1 for c in items]))
                cell[1] += len(items)
                cell[2] += sum(c[1] for c in items)
            elif op in (0x52, 0x81):  # REDUCE, NEWOBJ
                args = stack.pop()
                stack.pop()
                budget -= args[2]
                # only a fresh instance (NEWOBJ) may receive BUILD: a call may return a shared object
                # (an enum member, a layout), and BUILD on it would rewrite process-wide state
                stack.append([deep(args[0] + 1), 0, 0, op == 0x81])
            elif op == 0x62:  # BUILD
                state = stack.pop()
                budget -= state[1] + state[2]
                cell = stack[-1]
                if len(cell) < 4 or not cell[3]:
                    raise fail("it sets the state of an object it did not create (BUILD on a shared object)")
                cell[0] = deep(max(cell[0], state[0] + 1))
            elif op == 0x93:  # STACK_GLOBAL
                stack.pop()
                stack[-1] = _LEAF
            elif op == 0x92:  # NEWOBJ_EX
                kwargs, args = stack.pop(), stack.pop()
                stack.pop()
                budget -= args[2] + kwargs[1] + kwargs[2]
                stack.append([deep(max(args[0], kwargs[0]) + 1), 0, 0, True])
            elif op in (0x6F, 0x69):  # OBJ, INST
                items = pop_mark()
                budget -= sum(c[1] for c in items)
                stack.append([deep(1 + max((c[0] for c in items), default=0)), 0, 0, True])
            elif op == 0x30:  # POP
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif op == 0x31:  # POP_MARK
                pop_mark()
            elif op == 0x32:  # DUP
                stack.append(stack[-1])
            elif op == 0x51:  # BINPERSID
                stack[-1] = _LEAF
            elif op in (0x80, 0x95, 0x98):  # PROTO, FRAME, READONLY_BUFFER
                pass
            elif op == 0x2E:  # STOP
                stack.pop()
                return
            else:
                raise fail(f"its pickle holds an unknown opcode 0x{op:02x}")
            if budget < 0:
                raise fail(f"it asks the unpickler to copy more elements than its {n} bytes describe")
    except CorruptCheckpointError:
        raise
    except (IndexError, KeyError, ValueError, TypeError) as exc:  # TypeError: a value used as a container
        raise fail(f"its pickle is malformed ({type(exc).__name__})") from exc


def load_metadata_bytes(data: bytes, source: str, trust: bool) -> Any:
    """Unpickle a ``.metadata`` already read into memory; ``source`` names the file in errors.

    With ``trust`` it is stock DCP's plain ``pickle.loads``. Without, the pickle is first
    scanned, then unpickled with the exact allowlist; any failure of the bytes becomes a
    :class:`CorruptCheckpointError` (or :class:`UnsafeCheckpointError` for a forbidden name).
    """
    if trust:
        return pickle.loads(data)
    scan_pickle(data, source)
    try:
        return _MetadataUnpickler(io.BytesIO(data), source).load()
    except UnsafeCheckpointError:
        raise
    except MemoryError as exc:  # a length field claiming more than memory holds: the file cannot be whole
        raise _corrupt(source, "a length inside it claims more bytes than the file holds (truncated?)") from exc
    except RecursionError as exc:
        raise _corrupt(source, "it nests too deeply") from exc
    except Exception as exc:  # noqa: BLE001 - whatever the damaged bytes provoke, the answer is one typed error
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _corrupt(source, f"unpickling failed ({type(exc).__name__}: {detail[:200]})") from exc


def load_metadata(stream: IO[bytes], trust: bool, source: str = ".metadata") -> Any:
    """Compatibility wrapper: read ``stream`` fully, then :func:`load_metadata_bytes`."""
    return load_metadata_bytes(stream.read(), source, trust)


def _object_pickle(payload: bytes | memoryview, where: str) -> bytes:
    """The ``data.pkl`` of a ``torch.save`` archive, after checking the archive cannot inflate.

    ``torch.load`` trusts the zip directory's sizes; a hostile record could claim a huge
    compressed member. DCP and we write stored (uncompressed) members only.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(bytes(payload)))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CorruptCheckpointError(f"{where} is not a torch.save archive ({exc}); the checkpoint is damaged") from exc
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED or member.file_size > len(payload):
            raise CorruptCheckpointError(
                f"{where} holds a compressed or oversized archive member {member.filename!r}; the checkpoint is damaged"
            )
    pickles = [m for m in members if m.filename.endswith("/data.pkl") or m.filename == "data.pkl"]
    if len(pickles) != 1:
        raise CorruptCheckpointError(f"{where} is not a torch.save archive (no single data.pkl); the checkpoint is damaged")
    try:
        return archive.read(pickles[0])
    except zipfile.BadZipFile as exc:
        if "CRC" in str(exc):  # the archive's own checksum: these bytes are not the ones torch.save wrote
            raise ChecksumMismatchError(
                f"{where}: its archive's CRC-32 does not match its bytes (they were changed); the checkpoint is damaged"
            ) from exc
        raise CorruptCheckpointError(f"{where} is damaged ({exc})") from exc
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptCheckpointError(f"{where} is damaged ({exc})") from exc


def _bytes_from_data(*args: object) -> bytes:
    """``builtins.bytes`` for object records: ``pickle`` writes ``b""`` as a call of ``bytes()``.

    ``bytes(n)`` allocates ``n`` bytes, so an integer argument -- a size written in the file -- is refused.
    """
    if any(isinstance(arg, int) for arg in args):
        raise pickle.UnpicklingError("bytes(<integer>) would allocate memory sized by a number in the file")
    return bytes(*args)  # type: ignore[arg-type]


_bytes_from_data.__module__, _bytes_from_data.__qualname__ = "builtins", "bytes"
#: Plain-data globals that torch's weights-only unpickler lacks but ``torch.save`` emits for
#: ordinary objects (``b""``, frozensets) and ``io.BytesIO`` values (a trainer's ``torch.save``
#: blob, which stock DCP hands back as a ``BytesIO``); none can run code. A ``BytesIO`` is
#: a plain byte container: its pickle is ``NEWOBJ`` of an empty one and ``BUILD`` with
#: ``(bytes, position, dict)``, and we never unpickle the bytes inside it.
_PLAIN_DATA_GLOBALS: list[Any] = [_bytes_from_data, frozenset, io.BytesIO]


def check_object_record(payload: bytes | memoryview, key: str, relative_path: str, offset: int) -> None:
    """Raise unless the object record is a sound ``torch.save`` archive that ``torch.load(weights_only=True)`` accepts.

    Its pickle is scanned first (as ``.metadata`` is, bar the 64-bit integer limit: user
    objects may hold big integers), so it cannot crash or stall the unpickler either.
    """
    where = f"object {key!r} ({relative_path} at offset {offset}, {len(payload)} bytes)"
    scan_pickle(_object_pickle(payload, where), where, int_limit=False)
    try:
        with torch.serialization.safe_globals(_PLAIN_DATA_GLOBALS):
            torch.load(io.BytesIO(payload), weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"object {key!r} ({relative_path} at offset {offset}) is a pickle that safe loading refuses: "
            f"{first_line}. {_TRUST_HINT}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - damaged bytes: one typed error naming the record
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CorruptCheckpointError(
            f"{where} cannot be decoded ({type(exc).__name__}: {detail[:200]}); the checkpoint is damaged"
        ) from exc
