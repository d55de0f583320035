"""Read plan, first step: trust nothing a checkpoint's ``.metadata`` says until it is checked.

A checkpoint directory is input that anyone with write access can change. Before any
planner or reader acts on a ``.metadata``, this module

- reads it fully and unpickles it from memory through ``safe_pickle`` (exact allowlist,
  opcode scan), so a length field cannot drive an allocation and no name resolves to code;
- checks its whole structure once, linearly: exact DCP types, every record's
  ``relative_path`` a plain file name of this directory (never ``..``, ``/`` or an
  absolute path), offsets and lengths non-negative and bounded, every tensor chunk and
  object backed by a record large enough to hold it (so a tensor's size can never claim
  more memory than its files hold), and -- unless the checkpoint is trusted -- plain data
  only in ``planner_data`` and anything else stored there;
- checks the seal: a checkpoint saved by ``DataStatesWriter`` carries :data:`INTEGRITY_ATTR`
  on its ``Metadata`` (a plain dict stock DCP ignores) with the SHA-256 of its content, of
  every checksum side file and of the seal's own facts (optionally keyed: ``integrity``).
  Deleting or editing a side file, editing the seal, or flipping a bit of ``.metadata`` is
  then an error naming the file. What a checkpoint *without* a seal does -- loads
  unverified, or is refused -- is the reader's integrity policy (``integrity``).

Every failure is one of our typed errors naming the file and what is wrong.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from dcp_datastates.checksums import (
    MAX_CHECKSUM_FILE_BYTES,
    FileChecksums,
    checksum_file_name,
    parse_checksum_file,
    plain_file_name_problem,
    read_regular_file,
    sha256_hex,
)
from dcp_datastates.directory import METADATA_FILE, step_directories
from dcp_datastates.errors import (
    CheckpointIOError,
    CheckpointPathError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    DataStatesError,
    IncompleteCheckpointError,
    UnverifiedCheckpointError,
)
from dcp_datastates.integrity import KEY_ENV, IntegrityPolicy, key_id, mac_matches, seal_mac
from dcp_datastates.safe_pickle import load_metadata_bytes

#: Attribute of ``Metadata`` holding what ``DataStatesWriter`` sealed at commit (plain dict).
INTEGRITY_ATTR = "dcp_datastates_integrity"
INTEGRITY_FORMAT = 2
#: Largest offset, length or tensor size in bytes a record may claim (64 PiB).
MAX_BYTES = 1 << 56
MAX_DIMS = 64
#: Largest ``.metadata`` read into memory.
MAX_METADATA_BYTES = 8 << 30
#: Most bytes one stored byte of a stream-transformed record (stock ``ZStandard``) may decode to:
#: zstd's own limit is ~32768 (a 128 KiB block of one byte costs 4 bytes), so a record's
#: ``length`` -- its compressed size -- bounds what it can hold.
MAX_TRANSFORM_RATIO = 1 << 16
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: Our data files: ``__<rank>_<save tag>_<n>.distcp``; the side file is ``__<rank>_<save tag>_checksums.json``.
_OUR_DATA_FILE = re.compile(r"^(__\d+_[0-9a-f]+_)\d+\.distcp$")


# -- reading -------------------------------------------------------------------------------------
def read_checkpoint_metadata(directory: str | os.PathLike, *, trust: bool, hint: bool = True) -> Metadata:
    """``directory``'s ``.metadata``, unpickled safely and checked (see the module docstring).

    Without one, the error says so -- and, where ``directory`` is a root of ``step-N``
    checkpoints (``hint``), which ones it holds and the newest complete one.
    """
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointPathError(f"checkpoint path {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise CheckpointPathError(f"checkpoint path {str(directory)!r} is a file; DCP checkpoints are directories")
    path = directory / METADATA_FILE
    try:
        data = read_regular_file(path, MAX_METADATA_BYTES, "metadata file")
    except FileNotFoundError:
        root_hint = checkpoint_root_hint(directory, trust=trust) if hint else None
        if root_hint:
            raise IncompleteCheckpointError(root_hint) from None
        raise IncompleteCheckpointError(
            f"{str(directory)!r} is not a complete checkpoint: it has no {METADATA_FILE} file. A save into it "
            "failed or is still running, or this is not a checkpoint directory; load an earlier checkpoint."
        ) from None
    except PermissionError as exc:
        raise CheckpointPathError(f"cannot read {path}: permission denied") from exc
    if not data:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes); the checkpoint is damaged. Load another checkpoint.")
    metadata = load_metadata_bytes(data, str(path), trust)
    validate_metadata(metadata, str(path), trust=trust, budget=8 * len(data) + 100_000)
    return metadata


#: At most this many checkpoints are opened to find the newest complete one for a hint.
_HINT_CHECKS = 8


def checkpoint_root_hint(directory: Path, *, trust: bool) -> str | None:
    """What to say when ``directory`` is a root holding ``step-N`` checkpoints, not a checkpoint itself.

    Bounded work: the names are listed, and only the newest ones (at most ``_HINT_CHECKS``)
    are opened, from the newest down, until one is complete.
    """
    try:
        steps = step_directories(directory)
    except OSError:
        return None
    if not steps:
        return None
    names = [p.name for p in steps]
    shown = ", ".join(names if len(names) <= 6 else [*names[:2], "...", *names[-3:]])
    if len(names) > 6:
        shown += f" ({len(names)} in all)"
    newest = next((p for p in reversed(steps[-_HINT_CHECKS:]) if is_intact_checkpoint(p, trust=trust)), None)
    if newest is None:
        return (
            f"{str(directory)!r} is a checkpoint root, not a checkpoint: it holds {shown}, none of them complete "
            f"(the newest {min(len(steps), _HINT_CHECKS)} checked). Pass one checkpoint directory, e.g. "
            f"{str(steps[-1])!r}, or start fresh: latest_complete_checkpoint({str(directory)!r}) returns None here."
        )
    return (
        f"{str(directory)!r} is a checkpoint root, not a checkpoint: it holds {shown} (newest complete: "
        f"{newest.name}). Pass {str(newest)!r}, or latest_complete_checkpoint({str(directory)!r})."
    )


def is_intact_checkpoint(path: str | os.PathLike, *, trust: bool = False, policy: IntegrityPolicy | None = None) -> bool:
    """Whether ``path`` holds a checkpoint that parses and whose files are all there at their sizes.

    Under a ``policy`` that demands verification (``integrity='required'`` or a key; default:
    ``IntegrityPolicy.default()``), it must also be one that policy would load.
    """
    path = Path(path)
    policy = policy or IntegrityPolicy.default()
    try:
        metadata = read_checkpoint_metadata(path, trust=trust, hint=False)
        checksums = load_verified_checksums(path, metadata, policy)
        if policy.enforced and checksums.unverified:
            return False
        return not checksums.problems and not data_file_problems(path, metadata, checksums.files)
    except (DataStatesError, OSError):
        return False


# -- structure -----------------------------------------------------------------------------------
_FIELDS = {
    Metadata: {"state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version"},
    TensorStorageMetadata: {"properties", "size", "chunks"},
    TensorProperties: {"dtype", "layout", "requires_grad", "memory_format", "pin_memory"},
    ChunkStorageMetadata: {"offsets", "sizes"},
    BytesStorageMetadata: set(),
    StorageMeta: {"checkpoint_id", "save_id", "load_id", "modules"},
    MetadataIndex: {"fqn", "offset", "index"},
    _StorageInfo: {"relative_path", "offset", "length", "transform_descriptors"},
}
_REQUIRED = {
    Metadata: {"state_dict_metadata"},
    TensorStorageMetadata: {"properties", "size", "chunks"},
    ChunkStorageMetadata: {"offsets", "sizes"},
    MetadataIndex: {"fqn"},
    _StorageInfo: {"relative_path", "offset", "length"},
}
_PLAIN_LEAVES = (str, int, float, bool, bytes, type(None))
_PLAIN_CONTAINERS = (tuple, list, dict, set, frozenset)


class _Checker:
    def __init__(self, source: str, trust: bool, budget: int) -> None:
        self.source = source
        self.trust = trust
        self.budget = budget
        # sizes and properties already checked, by id (alive as long as the metadata holding them): a
        # ``.metadata`` shares equal ones among its entries, and each is checked once (a size is still
        # charged to the budget at every use); one table per type, so an object checked as one kind
        # is never taken for the other
        self.sizes: dict[int, tuple[int, ...]] = {}
        self.props: dict[int, dict[str, Any]] = {}

    def fail(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.source} is damaged or not a DCP metadata file: {what}. Restore it or load another checkpoint."
        )

    def spend(self, n: int = 1) -> None:
        self.budget -= n
        if self.budget < 0:
            raise self.fail("it describes more objects than its size allows")

    def fields(self, obj: object, where: str) -> dict[str, Any]:
        kind = type(obj)
        if kind not in _FIELDS:
            raise self.fail(f"{where} is a {kind.__name__}, not a DCP metadata type")
        try:
            state = object.__getattribute__(obj, "__dict__")
        except AttributeError:
            raise self.fail(f"{where} has no fields") from None
        if type(state) is not dict:
            raise self.fail(f"{where} has malformed fields")
        for name in state:
            if type(name) is not str:
                raise self.fail(f"{where} has a field named by a {type(name).__name__}")
        missing = _REQUIRED.get(kind, set()) - state.keys()
        if missing:
            raise self.fail(f"{where} lacks {sorted(missing)}")
        extra = state.keys() - _FIELDS[kind] - ({INTEGRITY_ATTR} if kind is Metadata else set())
        if extra and (kind is not Metadata or not self.trust):
            if kind is Metadata:
                for name in extra:
                    self.plain(state[name], f"{where}.{name}")
            else:
                raise self.fail(f"{where} has unknown fields {sorted(extra)[:5]}")
        return {name: state.get(name, getattr(kind, name, None)) for name in _FIELDS[kind]}

    def integer(self, value: object, where: str, low: int = 0, high: int = MAX_BYTES) -> int:
        if type(value) is not int or not low <= value <= high:
            raise self.fail(f"{where} is {value!r}, not an integer in [{low}, {high}]")
        return value

    def size(self, value: object, where: str) -> tuple[int, ...]:
        known = self.sizes.get(id(value))
        if known is not None:
            self.spend(len(known))  # met again, still paid for: what is done with it grows with its length
            return known
        if type(value) is not torch.Size:
            raise self.fail(f"{where} is a {type(value).__name__}, not a torch.Size")
        if len(value) > MAX_DIMS:
            raise self.fail(f"{where} has {len(value)} dimensions")
        self.spend(len(value))
        self.sizes[id(value)] = checked = tuple(self.integer(v, where) for v in value)
        return checked

    def properties(self, value: object, where: str) -> dict[str, Any]:
        """A tensor's ``TensorProperties``: of the types DCP builds them from."""
        known = self.props.get(id(value))
        if known is not None:
            return known
        props = self.fields(value, where)
        for name, kind in (("dtype", torch.dtype), ("layout", torch.layout), ("memory_format", torch.memory_format)):
            if type(props[name]) is not kind:
                raise self.fail(f"{where} has a {name} of type {type(props[name]).__name__}")
        for name in ("requires_grad", "pin_memory"):
            if type(props[name]) is not bool:
                raise self.fail(f"{where} has a non-boolean {name}")
        self.props[id(value)] = props
        return props

    def plain(self, value: object, where: str) -> None:
        """Only data: strings, numbers, None, bytes and containers of them (walked without recursion)."""
        if self.trust:
            return
        stack = [value]
        while stack:
            item = stack.pop()
            self.spend()
            if type(item) in _PLAIN_LEAVES:
                continue
            if type(item) in _PLAIN_CONTAINERS:
                if type(item) is dict:
                    stack.extend(item.keys())
                    stack.extend(item.values())
                else:
                    stack.extend(item)
                continue
            raise self.fail(f"{where} holds a {type(item).__name__}; only plain data is allowed there")


def validate_metadata(metadata: object, source: str, *, trust: bool = False, budget: int = 1 << 40) -> None:
    """Check the whole structure of an unpickled ``.metadata`` once (linear in its size).

    Raises :class:`CorruptCheckpointError` (or :class:`IncompleteCheckpointError` for a
    ``Metadata`` without file-system ``storage_data``) naming ``source`` and the problem.
    """
    c = _Checker(source, trust, budget)
    if type(metadata) is not Metadata:
        raise c.fail(f"it holds a {type(metadata).__name__}, not DCP Metadata")
    top = c.fields(metadata, "Metadata")
    sdm, storage = top["state_dict_metadata"], top["storage_data"]
    if type(sdm) is not dict:
        raise c.fail(f"state_dict_metadata is a {type(sdm).__name__}, not a dict")
    if storage is None:
        raise IncompleteCheckpointError(f"{source} has no storage_data: not a file-system checkpoint")
    if type(storage) is not dict:
        raise c.fail(f"storage_data is a {type(storage).__name__}, not a dict")

    # storage records: where every byte lives
    for index, info in storage.items():
        c.spend()
        idx = c.fields(index, "a storage_data key")
        fqn = idx["fqn"]
        if type(fqn) is not str:
            raise c.fail(f"a storage_data key names a {type(fqn).__name__}, not a state-dict key")
        if idx["offset"] is not None:
            c.size(idx["offset"], f"the offset of {fqn!r}'s record")
        if idx["index"] is not None:
            c.integer(idx["index"], f"the index hint of {fqn!r}'s record")
        where = f"{fqn!r}'s record"
        rec = c.fields(info, where)
        problem = plain_file_name_problem(rec["relative_path"])
        if problem:
            raise c.fail(f"{where} names data file {rec['relative_path']!r}, which {problem}")
        c.integer(rec["offset"], f"{where} offset")
        c.integer(rec["length"], f"{where} length")
        c.integer(rec["offset"] + rec["length"], f"{where} end")
        transforms = rec["transform_descriptors"]
        if transforms is not None and (
            type(transforms) not in (list, tuple) or not all(type(t) is str and len(t) <= 256 for t in transforms)
        ):
            # the read step undoes the transforms torch's extension registry knows (stock ZStandard) and
            # names any other as unsupported; here only their shape is checked
            raise c.fail(f"{where} has transform descriptors that are not a list of short strings")

    # state dict entries: every chunk backed by a record that can hold it
    for fqn, md in sdm.items():
        c.spend()
        if type(fqn) is not str:
            raise c.fail(f"state_dict_metadata has a {type(fqn).__name__} key")
        if type(md) is BytesStorageMetadata:
            c.fields(md, repr(fqn))
            if MetadataIndex(fqn) not in storage:
                raise c.fail(f"object {fqn!r} has no storage record")
            continue
        if type(md) is not TensorStorageMetadata:
            raise c.fail(f"entry {fqn!r} is a {type(md).__name__}, not tensor or object metadata")
        tensor = c.fields(md, repr(fqn))
        props = c.properties(tensor["properties"], f"{fqn!r} properties")
        shape = c.size(tensor["size"], f"{fqn!r} size")
        element = props["dtype"].itemsize
        numel = math.prod(shape)
        if numel * element > MAX_BYTES:
            raise c.fail(f"{fqn!r} claims {numel * element} bytes")
        chunks = tensor["chunks"]
        if type(chunks) is not list:
            raise c.fail(f"{fqn!r} chunks is a {type(chunks).__name__}, not a list")
        covered, boxes = 0, []
        for chunk in chunks:
            c.spend()
            ch = c.fields(chunk, f"a chunk of {fqn!r}")
            offsets = c.size(ch["offsets"], f"a chunk offset of {fqn!r}")
            sizes = c.size(ch["sizes"], f"a chunk size of {fqn!r}")
            if len(offsets) != len(shape) or len(sizes) != len(shape):
                raise c.fail(f"a chunk of {fqn!r} has {len(sizes)} dimensions, the tensor {len(shape)}")
            if any(o + s > d for o, s, d in zip(offsets, sizes, shape)):
                raise c.fail(f"a chunk of {fqn!r} at {list(offsets)} of size {list(sizes)} lies outside {list(shape)}")
            info = storage.get(MetadataIndex(fqn, ch["offsets"]))
            if info is None:
                raise c.fail(f"the chunk of {fqn!r} at {list(offsets)} has no storage record")
            chunk_numel = math.prod(sizes)
            capacity, compressed = info.length, ""
            if info.transform_descriptors:  # its length is what the transforms wrote (compressed)
                capacity, compressed = info.length * MAX_TRANSFORM_RATIO, f" (stream-transformed: at most {info.length * MAX_TRANSFORM_RATIO} decoded)"
            if chunk_numel * element > capacity:
                raise c.fail(
                    f"the chunk of {fqn!r} at {list(offsets)} holds {chunk_numel * element} bytes of data but its "
                    f"record in {info.relative_path} is only {info.length} bytes{compressed}"
                )
            covered += chunk_numel
            boxes.append((offsets, sizes))
        if numel > covered:
            raise c.fail(f"{fqn!r} of shape {list(shape)} is not covered by its {len(chunks)} chunk(s)")
        # DCP saves each element once (its global plan checks the same); overlapping chunks would
        # leave a load's result depending on the read order, or hide a gap of equal size
        if covered > numel:
            raise c.fail(f"the {len(chunks)} chunks of {fqn!r} hold {covered} elements, its shape {list(shape)} "
                         f"{numel}: they overlap")
        overlap = _overlapping_chunks(boxes, c.spend) if len(boxes) > 1 else None
        if overlap is not None:
            raise c.fail(f"chunks of {fqn!r} at {list(overlap[0])} and {list(overlap[1])} overlap")
    for index in storage:
        if index.fqn not in sdm:
            raise c.fail(f"storage_data holds a record for {index.fqn!r}, which state_dict_metadata lacks")

    c.plain(top["planner_data"], "planner_data")
    if not trust:
        _check_planner_data(c, top["planner_data"])
    if top["version"] is not None and type(top["version"]) is not str:
        raise c.fail("version is not a string")
    if top["storage_meta"] is not None:
        meta = c.fields(top["storage_meta"], "storage_meta")
        for name in ("checkpoint_id", "save_id", "load_id"):
            if meta[name] is not None and type(meta[name]) is not str and not c.trust:
                raise c.fail(f"storage_meta.{name} is a {type(meta[name]).__name__}, not a string")
        c.plain(meta["modules"], "storage_meta.modules")
    integrity_record(metadata, source)


def _overlapping_chunks(
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], spend: Callable[[int], None]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The offsets of two chunks that share an element, or None.

    A sweep along the dimension with the most distinct offsets: a chunk is compared only with
    those whose extent along it is still open, so a sharding along any one dimension costs a
    comparison or so per chunk, and a grid the chunks of its band. Each comparison is charged to
    ``spend`` by its dimensions, as a size is: chunks that stay open along every dimension (a
    hypercube of them) would otherwise make a file of some hundred KB cost a quadratic number
    of comparisons -- tens of seconds.
    """
    boxes = [box for box in boxes if all(box[1])]  # an empty chunk holds no element
    if len(boxes) < 2:
        return None
    dims = len(boxes[0][0])
    if dims == 0:  # two chunks of a scalar both hold its one element
        return boxes[0][0], boxes[1][0]
    sweep = max(range(dims), key=lambda d: len({offsets[d] for offsets, _ in boxes}))
    boxes.sort(key=lambda box: box[0][sweep])
    open_: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for offsets, sizes in boxes:
        start = offsets[sweep]
        open_ = [box for box in open_ if box[0][sweep] + box[1][sweep] > start]
        for other, other_sizes in open_:
            spend(dims)
            if all(o < p + s and p < o + t for o, t, p, s in zip(other, other_sizes, offsets, sizes)):
                return other, offsets
        open_.append((offsets, sizes))
    return None


#: Largest list index a key path may hold (``set_element`` grows lists up to it).
MAX_PATH_INDEX = 1 << 20


def _check_planner_data(c: _Checker, planner_data: object) -> None:
    """DCP's default planners store ``{flat key: key path}``; its loaders index and grow containers by it."""
    if planner_data is None:
        return
    if type(planner_data) is not dict:
        raise c.fail("planner_data is not DCP's mapping of flattened keys to key paths (a custom planner's? "
                     "pass trust_checkpoint=True if you trust the checkpoint)")
    for key, path in planner_data.items():
        if type(key) is not str or type(path) not in (tuple, list) or not 0 < len(path) <= MAX_DIMS:
            raise c.fail(f"planner_data entry {str(key)[:80]!r} is not a key path")
        for part in path:
            if type(part) is not str and not (type(part) is int and 0 <= part <= MAX_PATH_INDEX):
                raise c.fail(f"planner_data entry {key[:80]!r} has a path element {str(part)[:40]!r}")


# -- integrity record (fail closed) -------------------------------------------------------------
@dataclass(frozen=True)
class IntegrityRecord:
    """What ``DataStatesWriter`` sealed into ``.metadata`` at commit (see ``integrity`` for the policy)."""

    metadata_sha256: str
    checksum_files: dict[str, str]  # side file name -> SHA-256 of its bytes
    format: int = INTEGRITY_FORMAT
    checksums: bool = True  # saved with checksums (every data file then has them)
    key_id: str | None = None  # keyed seal: which key (``integrity.key_id``), and the HMAC of the digest
    mac: str | None = None


_RECORD_FIELDS = {1: {"format", "metadata_sha256", "checksum_files"},
                  2: {"format", "metadata_sha256", "checksum_files", "checksums", "key_id", "mac"}}
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


def integrity_record(metadata: Metadata, source: str = METADATA_FILE) -> IntegrityRecord | None:
    """The sealed record, validated; ``None`` for checkpoints written without one (stock DCP, older ours).

    Format 2 (this version) seals its own facts too; format 1 (earlier versions) sealed only
    the content, so it is read but never counts as verified end to end.
    """
    raw = vars(metadata).get(INTEGRITY_ATTR)
    if raw is None:
        return None

    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{source}: its integrity record ({INTEGRITY_ATTR}) is malformed ({what}); the checkpoint is damaged"
        )

    if type(raw) is not dict:
        raise bad(f"a {type(raw).__name__}, not a dict")
    fmt = raw.get("format")
    if type(fmt) is not int or fmt not in _RECORD_FIELDS:
        raise bad(f"unknown format {str(fmt)[:20]!r}")
    if set(raw) != _RECORD_FIELDS[fmt]:
        raise bad(f"fields {sorted(map(str, raw))[:8]}, expected {sorted(_RECORD_FIELDS[fmt])}")
    digest, files = raw["metadata_sha256"], raw["checksum_files"]
    if type(digest) is not str or not _SHA256.match(digest):
        raise bad("metadata_sha256 is not a SHA-256")
    if type(files) is not dict:
        raise bad("checksum_files is not a dict")
    for name, value in files.items():
        if plain_file_name_problem(name) or type(value) is not str or not _SHA256.match(value):
            raise bad(f"checksum file entry {str(name)[:80]!r}")
    if fmt == 1:
        return IntegrityRecord(digest, dict(files), 1, bool(files))
    checksums, kid, mac = raw["checksums"], raw["key_id"], raw["mac"]
    if type(checksums) is not bool or (files and not checksums):
        raise bad("checksums is not a boolean consistent with checksum_files")
    if (kid is None) != (mac is None) or (kid is not None and (
            type(kid) is not str or not _KEY_ID.match(kid) or type(mac) is not str or not _SHA256.match(mac))):
        raise bad("key_id and mac are not both absent or both well-formed")
    return IntegrityRecord(digest, dict(files), 2, checksums, kid, mac)


def metadata_digest(metadata: Metadata) -> str:
    """SHA-256 of everything that decides which bytes load where and how they are verified.

    Entries, chunks, records and planner_data; and, for a format-2 seal, the seal's own
    facts -- every side file and its SHA-256, whether the save had checksums, the key id --
    so emptying the list of side files, or any other edit of the seal, is detected.
    """
    # Each entry's part is ``repr((fqn, dtype, layout, requires_grad, memory_format, pin_memory, size,
    # chunks))``, assembled from the reprs of its pieces; a ``.metadata`` shares equal properties, sizes
    # and chunks among entries, so each piece's repr is made once per object (one table per kind).
    props_of: dict[int, str] = {}
    size_of: dict[int, str] = {}
    chunk_of: dict[int, str] = {}

    def props_repr(p: Any) -> str:
        known = props_of.get(id(p))
        if known is None:
            props_of[id(p)] = known = repr((str(p.dtype), str(p.layout), p.requires_grad, str(p.memory_format),
                                            p.pin_memory))[1:-1]
        return known

    def size_repr(size: Any) -> str:
        known = size_of.get(id(size))
        if known is None:
            size_of[id(size)] = known = repr(tuple(size))
        return known

    def chunk_repr(ch: Any) -> str:
        known = chunk_of.get(id(ch))
        if known is None:
            chunk_of[id(ch)] = known = f"({size_repr(ch.offsets)}, {size_repr(ch.sizes)})"
        return known

    parts: list[str] = []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            chunks = ", ".join([chunk_repr(ch) for ch in md.chunks])
            parts.append(f"({fqn!r}, {props_repr(md.properties)}, {size_repr(md.size)}, [{chunks}])")
        else:
            parts.append(repr((fqn, "object")))
    for index, info in (metadata.storage_data or {}).items():
        offset = "None" if index.offset is None else size_repr(index.offset)
        parts.append(f"({index.fqn!r}, {offset}, {info.relative_path!r}, {info.offset!r}, {info.length!r})")
    planner_data = metadata.planner_data
    plain = True
    try:
        _Checker("", False, 1 << 62).plain(planner_data, "")
    except CorruptCheckpointError:
        plain = False  # a custom planner's objects: their repr is not stable across a pickle round trip
    parts.append(repr(planner_data) if plain else "<planner_data not plain>")
    raw = vars(metadata).get(INTEGRITY_ATTR)
    if type(raw) is dict and raw.get("format") == INTEGRITY_FORMAT:
        files = raw.get("checksum_files")
        listed = sorted(files.items()) if type(files) is dict else repr(files)
        parts.append(repr(("seal", INTEGRITY_FORMAT, listed, raw.get("checksums"), raw.get("key_id"))))
    return sha256_hex("\n".join(parts).encode("utf-8", "surrogatepass"))


def seal_metadata(
    metadata: Metadata,
    directory: str | os.PathLike,
    checksum_files: Iterable[str],
    *,
    checksums: bool | None = None,
    key: bytes | None = None,
    dir_fd: int | None = None,
) -> None:
    """Writer side, right before commit: record the digests readers check (see the module docstring).

    ``checksum_files`` are the side files this save wrote; each is read back (never through a
    link; in ``dir_fd`` when given) and hashed. ``checksums``: whether the save had checksums
    (default: whether it wrote side files). With ``key``, the seal is keyed (HMAC-SHA256).
    """
    directory = Path(directory)
    files = {name: sha256_hex(read_regular_file(directory / name, MAX_CHECKSUM_FILE_BYTES, "checksum file", dir_fd))
             for name in sorted(set(checksum_files))}
    seal_metadata_with(metadata, files, checksums=checksums, key=key)


def seal_metadata_with(
    metadata: Metadata, checksum_file_digests: dict[str, str], *, checksums: bool | None = None, key: bytes | None = None
) -> None:
    """``seal_metadata`` from side-file digests computed elsewhere (a multi-level save: by the ranks that wrote them)."""
    files = dict(sorted(checksum_file_digests.items()))
    record: dict[str, Any] = {"format": INTEGRITY_FORMAT, "metadata_sha256": "", "checksum_files": files,
                              "checksums": bool(files) if checksums is None else checksums,
                              "key_id": None if key is None else key_id(key), "mac": None}
    setattr(metadata, INTEGRITY_ATTR, record)
    record["metadata_sha256"] = digest = metadata_digest(metadata)
    if key is not None:
        record["mac"] = seal_mac(key, digest)


def expected_checksum_files(directory: str | os.PathLike, data_files: Iterable[str]) -> list[str]:
    """Side files of ours that exist for ``data_files`` (the writer seals exactly these)."""
    directory = Path(directory)
    names = {checksum_file_name(m.group(1)) for f in data_files if (m := _OUR_DATA_FILE.match(f))}
    return sorted(n for n in names if (directory / n).is_file())


# -- data files and checksums against the directory ----------------------------------------------
@dataclass
class FileProblem:
    """One thing wrong with a checkpoint's files; ``error`` is the typed error a reader raises for it."""

    file: str
    offset: int
    length: int
    keys: list[str]
    reason: str
    message: str
    error: type[DataStatesError] = CheckpointIOError

    def exception(self) -> DataStatesError:
        return self.error(self.message)


@dataclass
class ChecksumSet:
    """The checksums a load may trust, whether the checkpoint was saved with them, and what is not verified."""

    files: dict[str, FileChecksums] = field(default_factory=dict)
    sealed: bool = False  # .metadata carries an integrity record
    saved_with_checksums: bool = False
    keyed: bool = False  # the seal's HMAC verified under the reader's key
    problems: list[FileProblem] = field(default_factory=list)
    #: Why the checkpoint is not verified end to end (what integrity='required' or a key refuses).
    unverified: list[str] = field(default_factory=list)


def records_by_file(metadata: Metadata) -> dict[str, list[tuple[int, int, str]]]:
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for index, info in metadata.storage_data.items():
        by_file.setdefault(info.relative_path, []).append((info.offset, info.length, index.fqn))
    return by_file


@dataclass
class SealFindings:
    """What a policy finds in a seal whose digest matched (``seal_findings``)."""

    forged: FileProblem | None = None  # the keyed seal does not verify: refuse under any policy
    unverified: list[str] = field(default_factory=list)  # why it is not verified end to end
    keyed: bool = False  # the seal verified under the policy's key


def seal_findings(record: IntegrityRecord, policy: IntegrityPolicy, source: str) -> SealFindings:
    """Under a key, the seal's HMAC must verify with it (else forged); an unkeyed seal or one of
    another key is unverified. Any policy: an older seal format, or a save without checksums, is
    unverified. Only a policy that demands verification (``policy.enforced``) refuses those.
    """
    found = SealFindings()
    if policy.key is not None:
        if record.mac is None:
            found.unverified.append("its seal is not keyed (it was saved without an integrity key, or its key was "
                                    "stripped)")
        elif record.key_id != policy.key_id:
            found.unverified.append(f"it was sealed with another key (key id {record.key_id}; yours is "
                                    f"{policy.key_id})")
        elif not mac_matches(policy.key, record.metadata_sha256, record.mac):
            found.forged = FileProblem(
                METADATA_FILE, 0, 0, [], "keyed seal does not verify under the integrity key",
                f"{source}: its keyed seal does not verify under your integrity key (key id {policy.key_id}): "
                "the checkpoint was forged or altered by someone without the key. Do not load it; load "
                "another checkpoint.", CorruptCheckpointError)
            return found
        else:
            found.keyed = True
    if record.format < INTEGRITY_FORMAT:
        found.unverified.append(f"it was sealed by an earlier version (seal format {record.format}) whose seal "
                                "does not cover its own list of checksum files; save it again")
    if not record.checksums:
        found.unverified.append("it was saved with checksums=False: its data bytes cannot be verified")
    return found


def load_verified_checksums(
    directory: str | os.PathLike, metadata: Metadata, policy: IntegrityPolicy | None = None
) -> ChecksumSet:
    """Checksums of the data files, from exactly the side files ``.metadata`` vouches for.

    Sealed checkpoints: ``.metadata``'s own digest must match (and, under a key, the seal's
    HMAC), every listed side file must exist with the recorded SHA-256 and parse, and every
    data file must be covered. Older checkpoints of ours (no seal) use the side file named
    after each data file, if present; stock checkpoints have none. Problems are collected,
    not raised (``verify`` reports all); so are the reasons it is not verified end to end
    (``unverified``), which only a policy that demands verification (``policy.enforced``) refuses.
    """
    directory = Path(directory)
    policy = policy or IntegrityPolicy()
    source = str(directory / METADATA_FILE)
    out = ChecksumSet()
    data_files = records_by_file(metadata)
    record = integrity_record(metadata, source)
    if record is None:
        out.unverified.append(f"it carries no seal ({INTEGRITY_ATTR}): it was written by stock DCP or an earlier "
                              "version, or its seal was removed")
        names = {n: "" for n in expected_checksum_files(directory, data_files)}
    else:
        out.sealed = True
        out.saved_with_checksums = record.checksums
        if metadata_digest(metadata) != record.metadata_sha256:
            out.problems.append(FileProblem(
                METADATA_FILE, 0, 0, [], "content differs from the digest recorded at save time",
                f"{source} has been altered since it was saved: its content does not match the SHA-256 recorded "
                "in it at commit; the checkpoint is damaged. Load another checkpoint.", CorruptCheckpointError))
            return out
        found = seal_findings(record, policy, source)
        if found.forged is not None:
            out.problems.append(found.forged)
            return out
        out.unverified.extend(found.unverified)
        out.keyed = found.keyed
        names = dict(record.checksum_files)
    for name, digest in sorted(names.items()):
        path = directory / name
        try:
            data = read_regular_file(path, MAX_CHECKSUM_FILE_BYTES, "checksum file")
        except FileNotFoundError:
            out.problems.append(FileProblem(
                name, 0, 0, [], "checksum file is missing",
                f"checksum file {name} of checkpoint {str(directory)!r} is missing, yet {METADATA_FILE} records that "
                "the checkpoint was saved with it; the checkpoint is damaged (pass verify_checksums=False to read "
                "it unverified)", ChecksumMismatchError))
            continue
        except (CorruptCheckpointError, OSError) as exc:
            out.problems.append(FileProblem(name, 0, 0, [], "checksum file unreadable", str(exc), CorruptCheckpointError))
            continue
        if digest and sha256_hex(data) != digest:
            out.problems.append(FileProblem(
                name, 0, len(data), [], "checksum file differs from the one sealed at save time",
                f"checksum file {name} of checkpoint {str(directory)!r} has been altered: its SHA-256 differs from "
                f"the one {METADATA_FILE} recorded at save time; the checkpoint is damaged", ChecksumMismatchError))
            continue
        try:
            out.files |= parse_checksum_file(data, name)
        except CorruptCheckpointError as exc:
            out.problems.append(FileProblem(name, 0, len(data), [], "checksum file malformed", str(exc), CorruptCheckpointError))
    if record is not None and record.checksums and not out.problems:
        for name, records in sorted(data_files.items()):
            if name not in out.files:
                out.problems.append(FileProblem(
                    name, 0, 0, sorted({k for _, _, k in records}), "no checksums recorded",
                    f"data file {name} has no checksums, although {METADATA_FILE} records that the checkpoint was "
                    "saved with them; the checkpoint is damaged", ChecksumMismatchError))
    return out


def unverified_error(directory: str | os.PathLike, policy: IntegrityPolicy, reasons: list[str]) -> UnverifiedCheckpointError:
    """The refusal of a checkpoint ``policy`` demands verified end to end (``reasons``: ``ChecksumSet.unverified``)."""
    return UnverifiedCheckpointError(
        f"checkpoint {str(directory)!r} cannot be verified end to end, as {policy.name} demands: "
        f"{'; '.join(reasons)}. Load it only if you trust where it came from, with "
        f"DataStatesConfig(integrity='if-present', integrity_key=None) (and {KEY_ENV} unset); or load a "
        "checkpoint saved by DataStatesWriter with checksums (and your key)."
    )


def data_file_problems(directory: str | os.PathLike, metadata: Metadata, checksums: dict[str, FileChecksums]) -> list[FileProblem]:
    """Referenced data files that are missing, not regular files, shorter than their records, or not the saved size."""
    directory = Path(directory)
    problems = []
    for name, records in sorted(records_by_file(metadata).items()):
        needed = max(offset + length for offset, length, _ in records)
        first_key = min(records)[2]
        try:
            info = os.lstat(directory / name)
        except FileNotFoundError:
            problems.append(FileProblem(
                name, 0, needed, sorted({k for _, _, k in records}), "file is missing",
                f"data file {name!r} of checkpoint {str(directory)!r} is missing (needed by {first_key!r}); "
                "the checkpoint is damaged"))
            continue
        if not stat.S_ISREG(info.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            problems.append(FileProblem(
                name, 0, needed, sorted({k for _, _, k in records}), f"is {kind}",
                f"data file {name!r} of checkpoint {str(directory)!r} is {kind}; data files are never read "
                "through links or from devices, so the checkpoint cannot be loaded as it is", CorruptCheckpointError))
            continue
        size = info.st_size
        expected = checksums.get(name)
        if expected is not None and size != expected.size:
            short = [k for o, n, k in records if o + n > size]
            problems.append(FileProblem(
                name, min(size, expected.size), abs(expected.size - size), sorted(set(short)),
                f"size {size} differs from saved size {expected.size}",
                f"{name} is {'truncated' if size < expected.size else 'longer than saved'}: {size} bytes, saved with "
                f"{expected.size} (holds {(short or [first_key])[0]!r}); the checkpoint is damaged",
                ChecksumMismatchError))
            continue
        if size < needed:
            short = sorted({k for o, n, k in records if o + n > size})
            problems.append(FileProblem(
                name, size, needed - size, short, f"truncated to {size} bytes",
                f"{short[0]!r}: {name} is truncated (records need {needed} bytes, the file has {size}); "
                "the checkpoint is damaged"))
    return problems
