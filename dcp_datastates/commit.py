"""Atomic commit: a checkpoint is visible only once every byte of it is durable.

The protocol (the commit step):
1. every rank writes its data files under names unique to this save and fsyncs them;
2. the coordinator pickles ``Metadata`` to a temporary name, fsyncs it, and renames
   it to ``.metadata`` -- the single atomic act that makes the checkpoint exist;
3. it fsyncs the directory so the rename and the new file names survive a crash;
4. only then are the data files of a replaced checkpoint deleted.

Because new data files never reuse the old names, overwriting a checkpoint cannot
corrupt it: until step 2 the old ``.metadata`` still points at intact old files.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

from torch.distributed.checkpoint.metadata import Metadata

from dcp_datastates.errors import CheckpointPathError

METADATA_FILE = ".metadata"
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


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_metadata(path: Path, metadata: Metadata, save_tag: str, fsync: bool) -> None:
    """Write ``.metadata`` atomically (temp file, fsync, rename, directory fsync)."""
    tmp = path / f"{METADATA_FILE}.{save_tag}.tmp"
    try:
        with open(tmp, "wb") as f:
            pickle.dump(metadata, f, protocol=pickle.HIGHEST_PROTOCOL)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path / METADATA_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_directory(path)


def remove_stale_files(path: Path, keep: set[str]) -> list[str]:
    """Delete data files of a replaced checkpoint and leftover temp metadata; never anything else."""
    removed = []
    for entry in os.scandir(path):
        if entry.name in keep or not entry.is_file():
            continue
        if _DATA_FILE_RE.match(entry.name) or _TMP_METADATA_RE.match(entry.name):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed
