"""Loading pickled checkpoint content without running code from the file.

A DCP checkpoint holds two kinds of pickles: ``.metadata`` (DCP's own dataclasses) and
one pickle per non-tensor object of the state dict. Stock DCP unpickles both with no
restriction, so a planted ``__reduce__`` runs arbitrary code at load time. We load
``.metadata`` in two steps, both on bytes already in memory:

1. **scan** every opcode (``pickletools.genops``, which never allocates what a length
   field claims) and refuse pickles that could crash or stall the real unpickler:
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
import pickletools
from collections import OrderedDict
from typing import IO, Any

import torch

from dcp_datastates.errors import CorruptCheckpointError, UnsafeCheckpointError

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


def _allowed() -> dict[tuple[str, str], Any]:
    """Every global a ``.metadata`` of DCP (ours or stock) may name, as exact pairs."""
    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"):
        allowed["torch.distributed.checkpoint.metadata", name] = getattr(metadata, name)
    allowed["torch.distributed.checkpoint.filesystem", "_StorageInfo"] = filesystem._StorageInfo
    for name in ("WriteItemType", "LoadItemType"):
        allowed["torch.distributed.checkpoint.planner", name] = getattr(planner, name)
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
        f"{source} is damaged or not a DCP metadata file: {what}. Restore it from a copy or load another checkpoint."
    )


_SCALAR_OPS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NEXT_BUFFER", "NONE", "NEWTRUE", "NEWFALSE",
    "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT", "GLOBAL", "EXT1", "EXT2",
    "EXT4", "PERSID",
}


def scan_pickle(data: bytes, source: str) -> None:
    """Refuse a pickle the C unpickler could crash, stall or exhaust memory on (see the module docstring).

    A stack machine over the opcodes tracks, per value, ``[nesting, length, inner]``: its
    container depth, its direct element count and its elements' element counts (what a
    call like ``tuple(x)`` copies). Mutable containers share their cell through the memo,
    as the objects do. Linear in the pickle's size.
    """
    budget = _COPY_BUDGET_PER_BYTE * len(data) + 4096
    stack: list[list[int]] = []
    marks: list[list[list[int]]] = []
    memo: dict[int, list[int]] = {}
    count = 0

    def made(depth: int, length: int, inner: int) -> list[int]:
        if depth > MAX_NESTING:
            raise _corrupt(source, f"it nests containers more than {MAX_NESTING} levels deep (byte {pos})")
        return [depth, length, inner]

    def pop_mark() -> list[list[int]]:
        nonlocal stack
        items, stack = stack, marks.pop()
        return items

    def spend(n: int) -> None:
        nonlocal budget
        budget -= n
        if budget < 0:
            raise _corrupt(source, f"it asks the unpickler to copy more elements than its {len(data)} bytes describe")

    def grow(cell: list[int], items: list[list[int]], added: int) -> None:
        depth = max([cell[0]] + [i[0] + 1 for i in items])
        if depth > MAX_NESTING:
            raise _corrupt(source, f"it nests containers more than {MAX_NESTING} levels deep (byte {pos})")
        cell[0] = depth
        cell[1] += added
        cell[2] += sum(i[1] for i in items)

    pos = 0
    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            count += 1
            if name in _SCALAR_OPS:
                if name in ("INT", "LONG", "LONG1", "LONG4") and not isinstance(arg, bool) and not -(2**63) <= arg < 2**63:
                    raise _corrupt(source, f"integer at byte {pos} does not fit in 64 bits")
                stack.append([0, 0, 0])
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"):
                stack.append([1, 0, 0])
            elif name == "MARK":
                marks.append(stack)
                stack = []
            elif name in ("TUPLE", "LIST", "DICT", "FROZENSET"):
                items = pop_mark()
                stack.append(made(1 + max((i[0] for i in items), default=0), len(items), sum(i[1] for i in items)))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                k = int(name[-1])
                if len(stack) < k:
                    raise IndexError
                items, stack[-k:] = stack[-k:], []
                stack.append(made(1 + max(i[0] for i in items), k, sum(i[1] for i in items)))
            elif name == "APPEND":
                item = stack.pop()
                grow(stack[-1], [item], 1)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                grow(stack[-1], [key, value], 1)
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
                items = pop_mark()
                grow(stack[-1], items, len(items))
            elif name == "POP":
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if not 0 <= arg <= count:
                    raise _corrupt(source, f"memo index {arg} at byte {pos} is beyond anything the file could store")
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name == "STACK_GLOBAL":
                stack.pop(), stack.pop()
                stack.append([0, 0, 0])
            elif name in ("REDUCE", "NEWOBJ"):
                args, _ = stack.pop(), stack.pop()
                spend(args[2])
                stack.append(made(args[0] + 1, 0, 0))
            elif name == "NEWOBJ_EX":
                kwargs, args, _ = stack.pop(), stack.pop(), stack.pop()
                spend(args[2] + kwargs[2] + kwargs[1])
                stack.append(made(max(args[0], kwargs[0]) + 1, 0, 0))
            elif name in ("OBJ", "INST"):
                items = pop_mark()
                spend(sum(i[1] for i in items))
                stack.append(made(1 + max((i[0] for i in items), default=0), 0, 0))
            elif name == "BUILD":
                state = stack.pop()
                spend(state[1] + state[2])
                grow(stack[-1], [state], 0)
            elif name == "BINPERSID":
                stack[-1] = [0, 0, 0]
            elif name in ("PROTO", "FRAME", "READONLY_BUFFER"):
                pass
            elif name == "STOP":
                stack.pop()
            else:  # pragma: no cover - every opcode of pickle protocol 5 is handled above
                raise _corrupt(source, f"unsupported opcode {name} at byte {pos}")
    except CorruptCheckpointError:
        raise
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        detail = str(exc) or type(exc).__name__
        raise _corrupt(source, f"its pickle is malformed at byte {pos} ({detail})") from exc


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


def check_object_record(payload: bytes | memoryview, key: str, relative_path: str, offset: int) -> None:
    """Raise unless the object record unpickles with ``torch.load(weights_only=True)``."""
    try:
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
            f"object {key!r} ({relative_path} at offset {offset}, {len(payload)} bytes) cannot be decoded "
            f"({type(exc).__name__}: {detail[:200]}); the checkpoint is damaged"
        ) from exc

