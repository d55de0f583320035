"""Loading pickled checkpoint content without running code from the file.

A DCP checkpoint holds two kinds of pickles: ``.metadata`` (DCP's own dataclasses) and
one pickle per non-tensor object of the state dict. Stock DCP unpickles both with no
restriction, so a planted ``__reduce__`` runs arbitrary code at load time. We load
``.metadata`` in two steps, both on bytes already in memory:

1. **scan** every opcode (``pickle_scan``): nothing is allocated from a number in the
   file, nothing nests deep enough to crash, no opcode changes an object the pickle did
   not build (an enum member, a class), no copyreg extension code resolves a name, and
   every dict key or set member is a string or a ``MetadataIndex`` -- so no hash table can
   be flooded with colliding keys.
2. **unpickle** with ``find_class`` resolving only an explicit list of exact
   ``(module, name)`` pairs, and exactly the names the scan resolved, in its order. A name
   with a dot is refused outright: protocol >= 4 resolves ``"os.system"`` *relative to*
   an allowed module, which is how a 100-byte ``.metadata`` could otherwise reach a shell.
   ``MetadataIndex`` resolves to a subclass whose hash is keyed per process; the
   ``storage_data`` keys are then rebuilt as real ``MetadataIndex`` once their real hashes
   are known not to pile up on one value.

Every object record is scanned the same way (names resolve as torch's weights-only
loader resolves them; colliding keys are counted, since user data has int-keyed dicts)
and then checked with ``torch.load(weights_only=True)`` before any planner unpickles it.
Trusting a checkpoint's content is an explicit opt-in (``trust_checkpoint=True`` /
``--trust``), which restores stock behaviour.
"""

from __future__ import annotations

import _codecs
import io
import os
import pickle
import secrets
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable
from enum import Enum
from typing import IO, Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

from dcp_datastates.errors import ChecksumMismatchError, CorruptCheckpointError, UnsafeCheckpointError
from dcp_datastates.pickle_scan import (
    ARGS_ELEMENTS,
    ARGS_MAPPING,
    DICT,
    FRESH,
    H_ID,
    H_NONE,
    H_OPAQUE,
    INDEX,
    LEAF,
    LIST,
    MAX_NESTING,
    SET,
    SHARED,
    STR,
    TRUST_HINT,
    TUPLE,
    UNHASHABLE,
    Callee,
    ScanPolicy,
    scan_pickle,
)

_TRUST_HINT = TRUST_HINT
#: Distinct ``storage_data`` keys that may share one real hash value (honest checkpoints: 1).
MAX_SHARED_INDEX_HASH = 8
__all__ = ["MAX_NESTING", "check_object_record", "load_metadata", "load_metadata_bytes", "scan_pickle"]


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


#: Keys ``_KeyedIndex`` hashes with: secret, so the hash cannot be computed outside this process.
_INDEX_KEY = secrets.token_hex(16)


class _KeyedIndex(MetadataIndex):
    """``MetadataIndex`` while a ``.metadata`` is unpickled: hashed with a per-process secret.

    DCP's own hash is ``hash((fqn, offset))``, which a file can make collide at will (same
    fqn, offsets with equal tuple hashes), turning ``storage_data`` into a quadratic table
    inside the unpickler. Never escapes a load: ``storage_data`` keys are rebuilt as real
    ``MetadataIndex``, and ``validate_metadata`` refuses this type anywhere else.
    """

    def __hash__(self) -> int:
        state = self.__dict__
        fqn, offset = state.get("fqn"), state.get("offset")
        if type(fqn) is not str or not (offset is None or type(offset) is torch.Size):
            raise TypeError("a storage_data key that is not a state-dict key with a torch.Size offset")
        return hash(f"{_INDEX_KEY}\0{fqn}\0{'' if offset is None else ','.join(map(str, offset))}")


def _allowed() -> dict[tuple[str, str], Any]:
    """Every global a ``.metadata`` of DCP (ours or stock) may name, as exact pairs."""
    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties"):
        allowed["torch.distributed.checkpoint.metadata", name] = getattr(metadata, name)
    allowed["torch.distributed.checkpoint.metadata", "MetadataIndex"] = _KeyedIndex
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


def _metadata_callee(name: str, target: Any) -> Callee:
    """What the scan must know of an allowlisted ``.metadata`` global (see ``pickle_scan.Callee``)."""
    if target is _KeyedIndex:
        return Callee(name, call=INDEX, new=INDEX)
    if isinstance(target, type) and target.__module__.startswith("torch.distributed.checkpoint."):
        return Callee(name, call=FRESH, new=FRESH)  # DCP's dataclasses: always a new instance
    if target in (OrderedDict, dict):
        return Callee(name, call=FRESH, new=FRESH, args=ARGS_MAPPING)
    if target is set:
        return Callee(name, call=SET, new=SET, args=ARGS_ELEMENTS)
    if target is frozenset:
        return Callee(name, call=TUPLE, new=TUPLE, args=ARGS_ELEMENTS)
    if target is list:
        return Callee(name, call=LIST, new=LIST)
    if target in (tuple, torch.Size):
        return Callee(name, call=TUPLE, new=TUPLE)
    if target in (complex, slice):
        return Callee(name, call=LEAF, new=LEAF)
    if target is _path_as_str:
        return Callee(name, call=STR, new=SHARED)
    return Callee(name)  # enum lookups, layouts, dtypes: shared objects


_ALLOWED: dict[tuple[str, str], Any] | None = None
_METADATA_CALLEES: dict[tuple[str, str], Callee] = {}


def _metadata_resolve(source: str) -> Callable[[str, str], Callee]:
    def resolve(module: str, name: str) -> Callee:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed()
        callee = _METADATA_CALLEES.get((module, name))
        if callee is None:
            target = _ALLOWED.get((module, name)) if "." not in name else None
            if target is None:
                raise _not_metadata_type(source, module, name)
            callee = _METADATA_CALLEES[module, name] = _metadata_callee(f"{module}.{name}", target)
        return callee

    return resolve


def _not_metadata_type(source: str, module: str, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{source} refers to {module}.{name}, which is not a DCP metadata type; refusing to unpickle "
        f"it (it could run code). {_TRUST_HINT}"
    )


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str, names: list[tuple[str, str]]) -> None:
        super().__init__(file)
        self.source = source
        self.names = iter(names)

    def find_class(self, module: str, name: str) -> Any:
        if next(self.names, None) != (module, name):  # the scan and the unpickler must read the same program
            raise _corrupt(self.source, f"its pickle names {module}.{name} where the scan read another name")
        target = _ALLOWED.get((module, name)) if _ALLOWED is not None and "." not in name else None
        if target is None:
            raise _not_metadata_type(self.source, module, name)
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata")


def _corrupt(source: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{source} is damaged: {what}. Restore it from a copy or load another checkpoint."
    )


def _real_storage_keys(metadata: Any, source: str) -> None:
    """Replace ``_KeyedIndex`` keys of ``storage_data`` by real ``MetadataIndex``, refusing piled-up hashes.

    The real hash is attacker-computable, so the new dict is filled only once no more than
    :data:`MAX_SHARED_INDEX_HASH` keys are known to share a hash value (linear either way).
    """
    if type(metadata) is not Metadata:
        return
    state = metadata.__dict__
    storage = state.get("storage_data")
    if type(storage) is not dict:
        return
    real_keys = []
    counts: dict[int, int] = {}
    for key in storage:
        if type(key) is _KeyedIndex:
            real = MetadataIndex.__new__(MetadataIndex)
            real.__dict__.update(key.__dict__)  # the same fields, checked by validate_metadata as they are
            try:  # BUILD may have changed the key after it was inserted: hash only what _KeyedIndex admits
                _KeyedIndex.__hash__(real)
            except TypeError:
                raise _corrupt(source, "a storage_data key is not a state-dict key with a torch.Size offset") from None
            h = hash(real)
            counts[h] = counts.get(h, 0) + 1
            if counts[h] > MAX_SHARED_INDEX_HASH:
                raise _corrupt(source, f"more than {MAX_SHARED_INDEX_HASH} storage_data keys share one hash value "
                                       "(a hash-flooding attempt)")
            key = real
        real_keys.append(key)
    state["storage_data"] = dict(zip(real_keys, storage.values()))


def load_metadata_bytes(data: bytes, source: str, trust: bool) -> Any:
    """Unpickle a ``.metadata`` already read into memory; ``source`` names the file in errors.

    With ``trust`` it is stock DCP's plain ``pickle.loads``. Without, the pickle is first
    scanned, then unpickled with the exact allowlist; any failure of the bytes becomes a
    :class:`CorruptCheckpointError` (or :class:`UnsafeCheckpointError` for what safe
    loading refuses but a trusted load would accept).
    """
    if trust:
        return pickle.loads(data)
    names = scan_pickle(data, source, ScanPolicy(_metadata_resolve(source), string_keys=True, int_limit=True))
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), source, names).load()
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except MemoryError as exc:  # a length field claiming more than memory holds: the file cannot be whole
        raise _corrupt(source, "a length inside it claims more bytes than the file holds (truncated?)") from exc
    except RecursionError as exc:
        raise _corrupt(source, "it nests too deeply") from exc
    except Exception as exc:  # noqa: BLE001 - whatever the damaged bytes provoke, the answer is one typed error
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _corrupt(source, f"unpickling failed ({type(exc).__name__}: {detail[:200]})") from exc
    _real_storage_keys(metadata, source)
    return metadata


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

    Its pickle is scanned first (as ``.metadata`` is, names resolving as torch's weights-only
    loader resolves them, colliding keys counted rather than refused, integers unbounded: user
    objects may hold big integers and int-keyed dicts), so it cannot crash or stall the
    unpickler, nor change an object it did not build.
    """
    where = f"object {key!r} ({relative_path} at offset {offset}, {len(payload)} bytes)"
    with torch.serialization.safe_globals(_PLAIN_DATA_GLOBALS):
        policy = ScanPolicy(_torch_resolve(where), string_keys=False, int_limit=False)
        scan_pickle(_object_pickle(payload, where), where, policy)
        _load_weights_only(payload, key, relative_path, offset, where)


def _load_weights_only(payload: bytes | memoryview, key: str, relative_path: str, offset: int, where: str) -> None:
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
            f"{where} cannot be decoded ({type(exc).__name__}: {detail[:200]}); the checkpoint is damaged"
        ) from exc


# -- object records: names as torch's weights-only loader resolves them ----------------------------
def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _tuple_of(items: object = ()) -> tuple:
    if type(items) is not tuple:
        raise TypeError("not a tuple")
    return items


def _object_callee(name: str, target: Any) -> Callee:
    """What the scan must know of a global that ``torch.load(weights_only=True)`` admits."""
    from torch import _weights_only_unpickler as weights_only

    value = target if _hashable(target) else UNHASHABLE
    if target in weights_only._tensor_rebuild_functions() or target is torch._tensor._rebuild_from_type_v2:
        return Callee(name, call=FRESH, hashes=H_ID, value=value)  # a new tensor (identity-hashed)
    if isinstance(target, type):
        if issubclass(target, Enum):  # calling it, or NEWOBJ of it, returns an existing member
            return Callee(name, hashes=H_ID, value=value)
        if target in (OrderedDict, Counter, dict):
            return Callee(name, call=FRESH, new=FRESH, args=ARGS_MAPPING, hashes=H_NONE, value=value)
        if target is set:
            return Callee(name, call=SET, new=SET, args=ARGS_ELEMENTS, value=value)
        if target is frozenset:
            return Callee(name, call=TUPLE, new=TUPLE, args=ARGS_ELEMENTS, value=value, model=frozenset)
        if target is complex:
            return Callee(name, call=LEAF, new=LEAF, value=value, model=complex)
        if target in (tuple, torch.Size):  # torch.Size hashes as the tuple of its sizes
            return Callee(name, call=TUPLE, new=TUPLE, value=value, model=_tuple_of)
        if target is torch.device:
            return Callee(name, call=LEAF, new=LEAF, value=value, model=torch.device)
        if target.__hash__ is None:
            hashes = H_NONE
        elif target.__hash__ is object.__hash__ or issubclass(target, torch.Tensor):
            hashes = H_ID
        else:
            hashes = H_OPAQUE  # a class with its own __hash__ (a user's safe global): counted, not modelled
        return Callee(name, call=FRESH, new=FRESH, hashes=hashes, value=value)
    if target is _codecs.encode or target is _bytes_from_data:
        return Callee(name, call=STR, value=value)
    return Callee(name, value=value)  # other functions, dtypes and the like: what they return may be shared


def _torch_resolve(where: str) -> Callable[[str, str], Callee]:
    """Resolve a name as ``torch._weights_only_unpickler`` does (call inside its ``safe_globals`` context)."""
    from torch import _weights_only_unpickler as weights_only
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING

    admitted = {**weights_only._get_user_allowed_globals(), **weights_only._get_allowed_globals()}
    cache: dict[str, Callee] = {}

    def resolve(module: str, name: str) -> Callee:
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[module, name]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        callee = cache.get(full)
        if callee is None:
            if module in weights_only._blocklisted_modules or full not in admitted:
                raise UnsafeCheckpointError(
                    f"{where} is a pickle that safe loading refuses: it refers to {full}, which "
                    f"torch.load(weights_only=True) does not admit (it could run code). {_TRUST_HINT}"
                )
            callee = cache[full] = _object_callee(full, admitted[full])
        return callee

    return resolve
