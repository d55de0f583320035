"""Atomic commit: a checkpoint is visible only once every byte of it is durable.

The protocol (the commit step):
1. every rank writes its data files under names unique to this save -- each created
   exclusively, never through a link (``dir_files``) -- fsyncs them, and checks they are
   still linked under their names (``dir_files.check_still_linked``);
2. the coordinator opens the directory the save *started* in (same device and inode, see
   ``save_claim``) and checks that every file the metadata references is there, a regular
   file at least as long as its records need -- a directory removed or files replaced
   mid-save fail here; then it seals ``.metadata`` (``metadata_check.seal_metadata``,
   reading the side files through that descriptor);
3. it pickles ``Metadata`` to a new file of an unpredictable temporary name (created
   exclusively), fsyncs it, and renames it to ``.metadata`` -- the single atomic act
   that makes the checkpoint exist;
4. it fsyncs the directory so the rename and the new file names survive a crash;
5. only then are the data files of a replaced checkpoint deleted.

Every step works through the descriptor of step 2, so nothing is ever created in a
directory that replaced the original. Because new data files never reuse the old names,
overwriting cannot corrupt the old checkpoint: until step 3 its ``.metadata`` points at
intact old files, and a crash at any point leaves the old checkpoint or the new one,
never neither (``tests/test_commit_crash.py`` kills the process at each step).
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import contextlib
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata,
)

from dcp_datastates.dir_files import CheckpointDir
from dcp_datastates.directory import METADATA_FILE
from dcp_datastates.errors import CheckpointDirectoryChangedError, CheckpointIOError, CheckpointPathError
from dcp_datastates.save_claim import DirectoryIdentity

logger = logging.getLogger("dcp_datastates")

#: Files a DCP writer (ours or stock) creates; the only ones a commit may delete.
_DATA_FILE_RE = re.compile(r"^__\d+_.*(\.distcp|_checksums\.json)$")
_TMP_METADATA_RE = re.compile(r"^\.metadata\..*\.tmp$")


def prepare_directory(path: Path) -> None:
    """Create the checkpoint directory, or say clearly why it cannot be used."""
    if path.exists() and not path.is_dir():
        raise CheckpointPathError(
            f"checkpoint path {str(path)!r} is a file, not a directory; DCP checkpoints are directories. "
            "Choose another path or remove the file."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointPathError(
            f"cannot create checkpoint directory {str(path)!r}: {exc.strerror}. "
            "Check that the parent exists and is writable by this user."
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise CheckpointPathError(
            f"checkpoint directory {str(path)!r} is not writable by this user (uid {os.getuid()}). "
            "Fix its permissions or choose another path."
        )


def has_complete_checkpoint(path: Path) -> bool:
    return (path / METADATA_FILE).is_file()


def required_sizes(records: Iterable[tuple[str, int, int]]) -> dict[str, int]:
    """``(relative_path, offset, length)`` records -> the least size each file must have."""
    sizes: dict[str, int] = {}
    for name, offset, length in records:
        sizes[name] = max(sizes.get(name, 0), offset + length)
    return sizes


def check_files(dir_fd: int, directory: Path, required: dict[str, int]) -> None:
    """Every referenced file exists and is long enough: never publish a ``.metadata`` over holes."""
    problems = []
    for name, size in sorted(required.items()):
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        actual = info.st_size
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{name} is {'a symbolic link' if stat.S_ISLNK(info.st_mode) else 'not a regular file'}")
        elif info.st_nlink != 1:  # ours have one link; another means it was replaced by a link to some other file
            problems.append(f"{name} has {info.st_nlink} hard links")
        elif actual < size:
            problems.append(f"{name} has {actual} bytes, its records need {size}")
    if problems:
        raise CheckpointDirectoryChangedError(
            f"refusing to commit {str(directory)!r}: {'; '.join(problems[:5])}"
            f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. Files were removed or replaced "
            "while the save ran (another job, a cleanup script, rm -rf?); no .metadata was written."
        )


def temp_metadata_name(save_tag: str) -> str:
    """An unpredictable name for the temporary ``.metadata`` (nobody can plant a link there in advance)."""
    return f"{METADATA_FILE}.{save_tag}.{secrets.token_hex(16)}.tmp"


def pickle_metadata(metadata: Metadata) -> bytes:
    """``.metadata``'s bytes: stock DCP's pickle, with equal small values pickled once.

    Per tensor DCP builds its own ``TensorProperties``, ``torch.Size`` objects and chunk
    records, though most are equal (every fp32 tensor's properties, every ``(0,)`` offset).
    Pointing equal ones at one object lets the pickle refer back to it (a memo fetch instead of
    rebuilding it): for 50,000 small tensors the file is ~30% smaller, and the safety scan and
    the unpickling that every load runs on it take about half the time. Stock DCP reads it as
    any other pickle; the values, and so the seal's digest, are unchanged. The fields are
    pointed at the shared objects only while pickling, then given back: the ``Metadata`` that
    ``dcp.save`` returns keeps objects of its own, as stock's does. Values of other types (a
    custom planner's) are pickled as they are.
    """
    shared: dict[tuple, object] = {}
    # what was replaced, in three flat lists: a tuple per field would be a new object for the
    # collector to track, and its passes over a graph of this size cost seconds
    owners: list[object] = []
    fields: list[str] = []
    originals: list[object] = []

    def one(value: object) -> object:
        """The first object equal to ``value`` (of its type) met in this ``.metadata``."""
        if type(value) is torch.Size:
            key: tuple = (torch.Size, *value)
        elif type(value) is TensorProperties:
            key = (TensorProperties, value.dtype, value.layout, value.requires_grad, value.memory_format, value.pin_memory)
        elif type(value) is ChunkStorageMetadata:  # its offsets and sizes already shared
            key = (ChunkStorageMetadata, id(value.offsets), id(value.sizes))
        else:
            return value
        try:
            return shared.setdefault(key, value)
        except TypeError:  # an unhashable field: not shared
            return value

    def point(obj: object, field: str, value: object) -> None:
        old = getattr(obj, field)
        if old is not value:
            owners.append(obj)
            fields.append(field)
            originals.append(old)
            object.__setattr__(obj, field, value)  # MetadataIndex is frozen; an equal offset keeps its hash

    try:
        for md in metadata.state_dict_metadata.values():
            if type(md) is TensorStorageMetadata:
                point(md, "properties", one(md.properties))
                point(md, "size", one(md.size))
                for chunk in md.chunks:
                    if type(chunk) is ChunkStorageMetadata:
                        point(chunk, "offsets", one(chunk.offsets))
                        point(chunk, "sizes", one(chunk.sizes))
                if type(md.chunks) is list:
                    point(md, "chunks", [one(chunk) for chunk in md.chunks])
        for index in metadata.storage_data or {}:
            if type(index) is MetadataIndex:
                point(index, "offset", one(index.offset))
        return pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        for obj, field, old in zip(reversed(owners), reversed(fields), reversed(originals)):
            object.__setattr__(obj, field, old)


def write_temp_metadata(dir_fd: int, tmp_name: str, metadata: Metadata | bytes, fsync: bool, directory: Path) -> None:
    """Write ``metadata`` pickled -- or, as bytes, already pickled (tier copies publish the very same bytes) --
    into a new file ``tmp_name`` (created exclusively, never through a link)."""
    data = metadata if isinstance(metadata, bytes) else pickle_metadata(metadata)
    CheckpointDir(dir_fd, directory).write_new(tmp_name, data, fsync)


def publish(dir_fd: int, tmp_name: str) -> None:
    """The commit point: after this rename the new checkpoint exists, before it the old one does.

    It replaces the previous ``.metadata`` (an overwrite) -- the one name a save replaces; a
    rename replaces the entry itself, never what a link there points at.
    """
    os.replace(tmp_name, METADATA_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def fsync_directory(path: Path | int) -> None:
    """fsync a directory, given by path or by an open descriptor."""
    if isinstance(path, int):
        os.fsync(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_files(dir_fd: int, keep: set[str]) -> list[str]:
    """Delete data files of a replaced checkpoint and leftover temp metadata; never anything else."""
    removed = []
    for entry in os.scandir(dir_fd):
        if entry.name in keep or not entry.is_file(follow_symlinks=False):
            continue
        if _DATA_FILE_RE.match(entry.name) or _TMP_METADATA_RE.match(entry.name):
            os.unlink(entry.name, dir_fd=dir_fd)
            removed.append(entry.name)
    return removed


def commit_checkpoint(
    identity: DirectoryIdentity,
    metadata: Metadata | bytes,
    save_tag: str,
    *,
    fsync: bool,
    required: dict[str, int],
    keep: set[str],
    seal: Callable[[int], None] | None = None,
    commit_point: Callable[[], AbstractContextManager[None]] | None = None,
) -> list[str]:
    """Run steps 2-5 of the protocol; return the stale files removed.

    ``seal(dir_fd)`` runs once the files are checked, right before ``.metadata`` is written.
    ``commit_point`` (the save's ``InFlightSave.commit_point``) is entered around the
    rename alone: it refuses a save abandoned by then, and makes later abandonment
    wait for -- and give way to -- the rename.

    Raises :class:`CheckpointDirectoryChangedError` (nothing published) when the directory
    or a file vanished, and :class:`CheckpointIOError` when the directory fsync fails after
    the rename (the checkpoint is published and loads, but may not survive a power loss).
    A failure to remove stale files is only logged: the checkpoint is committed, and the
    leftovers are removed by the next overwrite.
    """
    dir_fd = identity.open()
    try:
        check_files(dir_fd, identity.path, required)
        if seal is not None:
            try:
                seal(dir_fd)
            except FileNotFoundError as exc:  # a side file (or the directory) vanished after the check
                raise identity.changed("or one of its checksum files was removed") from exc
        tmp_name = temp_metadata_name(save_tag)
        created = False
        try:
            write_temp_metadata(dir_fd, tmp_name, metadata, fsync, identity.path)
            created = True
            with commit_point() if commit_point is not None else contextlib.nullcontext():
                publish(dir_fd, tmp_name)
        except BaseException as exc:
            if created and not CheckpointDir(dir_fd, identity.path).is_regular(tmp_name):
                raise  # renamed into place: published, whatever failed after it
            if created or not isinstance(exc, CheckpointDirectoryChangedError):
                try:  # ours (never a planted entry at the name: creation would have failed)
                    os.unlink(tmp_name, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
            if isinstance(exc, FileNotFoundError):  # the directory was unlinked after step 2
                raise identity.changed("was removed") from exc
            if isinstance(exc, OSError) and exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY):
                raise CheckpointPathError(
                    f"cannot publish {identity.path / METADATA_FILE}: a directory is in its place; nothing was "
                    "committed. Remove it and save again."
                ) from exc
            if isinstance(exc, OSError) and not isinstance(exc, CheckpointIOError):
                raise CheckpointIOError(
                    exc.errno or errno.EIO,
                    f"cannot commit {str(identity.path)!r}: writing or renaming its .metadata failed "
                    f"({exc.strerror or exc}); nothing was committed, the previous checkpoint is untouched",
                ) from exc
            raise
        if fsync:
            try:
                fsync_directory(dir_fd)
            except OSError as exc:
                raise CheckpointIOError(
                    exc.errno,
                    f"checkpoint {str(identity.path)!r} was published (.metadata renamed into place) but fsync "
                    f"of the directory failed ({exc.strerror}): it loads now, but may not survive a power loss. "
                    "Check the file system, then save again.",
                ) from exc
        try:
            return remove_stale_files(dir_fd, keep)
        except OSError as exc:
            logger.warning(
                "dcp_datastates: checkpoint %s is committed, but removing the replaced checkpoint's files failed "
                "(%s); they are harmless and the next overwrite removes them",
                identity.path,
                exc,
            )
            return []
    finally:
        os.close(dir_fd)
