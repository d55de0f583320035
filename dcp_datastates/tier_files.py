"""Multi-level checkpoints, the files: committing a tier copy, copying files durably, taking stock of a copy.

Every copy -- a node's local directory, a partner copy, the drained shared checkpoint --
is committed with the protocol of ``commit.py``: its data files are fsynced first, a
small manifest (``.tier.json``: who wrote which files, for which world size) next, and
``.metadata`` last, through a temporary name, a rename and a directory fsync. All copies
of one save publish the *same* ``.metadata`` bytes, so a copy is recognised as that
save's by the digest sealed in it, and the shared copy is byte for byte the local one.

``inventory`` is the read side: which of a copy's files are intact (present, of the size
their checksums record, their side file matching the digest sealed in ``.metadata``).
Bytes are verified when a restore reads them (``tier_restore``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from torch.distributed.checkpoint.metadata import Metadata

from dcp_datastates.checksums import CHECKSUM_FILE_SUFFIX, MAX_CHECKSUM_FILE_BYTES, parse_checksum_file, read_regular_file, sha256_hex
from dcp_datastates.commit import commit_checkpoint, fsync_directory
from dcp_datastates.dir_files import CheckpointDir, only_ours
from dcp_datastates.directory import METADATA_FILE
from dcp_datastates.errors import CheckpointDirectoryChangedError, CheckpointIOError, DataStatesError
from dcp_datastates.integrity import IntegrityPolicy
from dcp_datastates.metadata_check import (
    MAX_METADATA_BYTES,
    integrity_record,
    metadata_digest,
    records_by_file,
    seal_findings,
    validate_metadata,
)
from dcp_datastates.resume import step_of
from dcp_datastates.safe_pickle import load_metadata_bytes
from dcp_datastates.save_claim import DirectoryIdentity
from dcp_datastates.tiers import MANIFEST_FILE

logger = logging.getLogger("dcp_datastates")

MANIFEST_FORMAT = 1
#: A drain holds a shared lock on this file in the local copy it reads; pruning takes it exclusively.
PIN_FILE = ".dcp_datastates.drain"
COPY_CHUNK_BYTES = 8 * 1024**2


@dataclass(frozen=True)
class Manifest:
    """What a tier copy holds: which save, written by which job shape."""

    step: str
    save_tag: str
    world_size: int
    kind: str  # "local" or "partner"
    node: str  # the node whose ranks wrote the files
    ranks: tuple[int, ...]

    def to_json(self) -> bytes:
        return json.dumps({"format": MANIFEST_FORMAT, "step": self.step, "save_tag": self.save_tag,
                           "world_size": self.world_size, "kind": self.kind, "node": self.node,
                           "ranks": list(self.ranks)}, sort_keys=True).encode()

    @classmethod
    def read(cls, directory: Path) -> "Manifest | None":
        try:
            raw = json.loads(read_regular_file(directory / MANIFEST_FILE, 1 << 20, "tier manifest"))
            if raw.get("format") != MANIFEST_FORMAT:
                return None
            return cls(str(raw["step"]), str(raw["save_tag"]), int(raw["world_size"]), str(raw["kind"]),
                       str(raw["node"]), tuple(int(r) for r in raw["ranks"]))
        except (OSError, DataStatesError, ValueError, KeyError, TypeError):
            return None


def commit_copy(directory: Path, metadata_bytes: bytes, manifest: Manifest, required: dict[str, int], *, fsync: bool,
                identity: DirectoryIdentity | None = None,
                commit_point: Callable[[], AbstractContextManager[None]] | None = None) -> None:
    """Publish a tier copy in ``directory``: manifest, then ``.metadata`` (``commit.py``'s protocol).

    ``identity``: the directory the save started in (``save_claim``), when it is known.
    ``commit_point``: the save's own (``shutdown.InFlightSave``), so that Ctrl-C or SIGTERM up to
    the rename abandons the copy, as it abandons a single-tier save.
    """
    identity = identity if identity is not None and identity.path == directory else DirectoryIdentity.of(directory)
    write_durably(directory, MANIFEST_FILE, manifest.to_json(), fsync=fsync)
    commit_checkpoint(identity, metadata_bytes, manifest.save_tag, fsync=fsync, required=required,
                      keep=set(required) | {MANIFEST_FILE}, commit_point=commit_point)
    remove_stale_temporaries(directory)


def write_durably(directory: Path, name: str, data: bytes, *, fsync: bool) -> None:
    """Put ``data`` at ``directory/name`` whole or not at all (a new file, renamed into place)."""
    with NewFile(directory, name) as new:
        view = memoryview(data)
        while view:
            view = view[os.write(new.fd, view):]
        new.publish(fsync=fsync)


#: ``NewFile``'s temporary names: ``<name>.<16 hex digits>.part``.
_TEMPORARY = re.compile(r".+\.[0-9a-f]{16}\.part")


class NewFile:
    """A file written into ``directory`` under an unpredictable temporary name, renamed to ``name`` when whole.

    A copy's directory may be writable by others (the shared path is): the temporary file is
    created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to the directory's descriptor
    (``dir_files.CheckpointDir``), so a link or file planted at any name is never written
    through, and the rename replaces the entry at ``name`` (a link planted there included)
    without following it. Leaving the ``with`` block without :meth:`publish` removes the
    temporary file.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.tmp = f"{name}.{secrets.token_hex(8)}.part"
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CheckpointIOError(exc.errno or errno.EIO, f"cannot open directory {directory}: {exc.strerror or exc}") from exc
        self.dir = CheckpointDir(dir_fd, directory)
        try:
            self.fd = self.dir.create(self.tmp)
        except BaseException:
            self.dir.close()
            raise
        created = os.fstat(self.fd)
        self.inode = (created.st_dev, created.st_ino)  # cleanup removes this file, never one put in its place
        self.published = False

    def publish(self, *, fsync: bool) -> None:
        """Make the file durable (``fsync``), check it is still ours, and rename it to its name."""
        if self.fd >= 0:
            if fsync:
                os.fsync(self.fd)
            self.dir.check_linked(self.fd, self.tmp)
            os.close(self.fd)
            self.fd = -1
        try:
            os.replace(self.tmp, self.name, src_dir_fd=self.dir.fd, dst_dir_fd=self.dir.fd)
        except OSError as exc:
            raise self.dir.creation_error(self.name, exc) from exc
        self.published = True

    def __enter__(self) -> "NewFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file; remove the temporary one unless it was published. Idempotent."""
        if self.dir.fd < 0:
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.published:
            self.dir.remove(self.tmp, self.inode)
        self.dir.close()


def remove_stale_temporaries(directory: Path) -> list[str]:
    """Unlink what interrupted copies left under ``NewFile`` temporary names (``<name>.<16 hex>.part``).

    A copy killed mid-file (a node lost, SIGKILL) leaves its temporary file. Called right after a
    copy of ``directory`` is committed -- every rank of the job has agreed that its part of the
    copy is written -- so what is left under such a name is no live copy's. Only regular files with
    one name are removed (``only_ours``); links and anything else are left alone.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if _TEMPORARY.fullmatch(entry.name) is None:
            continue
        try:
            if only_ours(entry.stat(follow_symlinks=False)):
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            pass
    return removed



def open_source(path: Path) -> int:
    """A read descriptor of the regular file ``path``: never through a link, never blocking on a FIFO."""
    return _open_regular(path, os.O_RDONLY, "tier copies are never made through links; remove it, the copy is not "
                         "made from it")


def _open_regular(path: Path, flags: int, remedy: str) -> int:
    """``os.open`` with ``flags`` that never follows a link or blocks on a FIFO, and keeps only a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise CheckpointIOError(exc.errno or errno.EIO, f"cannot open {path}: {exc.strerror or exc}") from exc
        fd = -1
    if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd >= 0:
            os.close(fd)
        raise CheckpointDirectoryChangedError(
            f"{path} is not a regular file (a link or other entry put in place of ours?); {remedy}.")
    return fd


def make_copy_dir(directory: Path) -> None:
    """Create ``directory`` (and its parents) for a copy; refuse one that is a link or not a directory."""
    directory.mkdir(parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(directory).st_mode):
        raise CheckpointDirectoryChangedError(
            f"{directory} is a link (or not a directory); tier copies are only written into real directories. "
            "Remove it; the copy was not made.")


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset`` (short writes continued)."""
    view = data
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_file(source: Path, target: Path, *, fsync: bool) -> int:
    """Copy ``source`` to ``target`` through a new temporary file (a crash leaves no half file under the name)."""
    src = open_source(source)
    try:
        with NewFile(target.parent, target.name) as new:
            copied = 0
            while True:
                n = os.sendfile(new.fd, src, copied, COPY_CHUNK_BYTES)
                if n == 0:
                    break
                copied += n
            new.publish(fsync=fsync)
    finally:
        os.close(src)
    return copied


def remove_files(directory: Path, names: list[str]) -> None:
    """Unlink ``names`` in ``directory`` where they are files ``only_ours`` (never following a link)."""
    for name in names:
        try:
            if only_ours(os.lstat(directory / name)):
                (directory / name).unlink()
        except OSError:
            pass


def is_side_file(name: str) -> bool:
    return name.endswith(CHECKSUM_FILE_SUFFIX)


# -- what a copy holds ------------------------------------------------------------------------------
@dataclass
class CopyInventory:
    """One copy of one save: where, which save (digest), which of its files are intact here."""

    directory: str
    step: int
    digest: str
    referenced: frozenset[str]  # every file the save consists of (data files and their side files)
    intact: frozenset[str]
    world_size: int | None  # from the manifest; None for a shared copy
    node: str | None
    kind: str  # "local", "partner" or "shared"
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.referenced <= self.intact


def read_metadata_bytes(directory: Path) -> bytes:
    return read_regular_file(directory / METADATA_FILE, MAX_METADATA_BYTES, "metadata file")


def parse_metadata(data: bytes, source: str) -> Metadata:
    metadata = load_metadata_bytes(data, source, False)
    validate_metadata(metadata, source, budget=8 * len(data) + 100_000)
    return metadata


def inventory(directory: Path, kind: str, policy: IntegrityPolicy | None = None,
              refused: list[str] | None = None) -> CopyInventory | None:
    """Which files of the save in ``directory`` are intact; None if it is no committed, sealed copy.

    Under ``policy``, also None for a copy the policy refuses -- a keyed seal that does not verify
    (forged), or, where the policy demands verification, an unkeyed seal, another key's, or a
    save without checksums: such a copy is never a restore's source. Why goes into ``refused``.
    """
    step = step_of(directory.name)
    if step is None:
        return None
    try:
        data = read_metadata_bytes(directory)
        metadata = parse_metadata(data, str(directory / METADATA_FILE))
        record = integrity_record(metadata)
        if record is None or metadata_digest(metadata) != record.metadata_sha256:
            return None
        if policy is not None:
            found = seal_findings(record, policy, str(directory / METADATA_FILE))
            if found.forged is not None or (policy.enforced and found.unverified):
                why = found.forged.message if found.forged is not None else f"{directory}: {'; '.join(found.unverified)}"
                logger.warning("dcp_datastates: %s is not used for a restore: %s", directory, why)
                if refused is not None:
                    refused.append(why)
                return None
        by_file = records_by_file(metadata)
        referenced = set(by_file) | set(record.checksum_files)
        intact: set[str] = set()
        sizes: dict[str, int] = {}
        checksums = {}
        for name, digest in record.checksum_files.items():
            try:
                raw = read_regular_file(directory / name, MAX_CHECKSUM_FILE_BYTES, "checksum file")
            except (OSError, DataStatesError):
                continue
            if sha256_hex(raw) == digest:
                try:
                    checksums.update(parse_checksum_file(raw, name))
                except DataStatesError:
                    continue
                intact.add(name)
                sizes[name] = len(raw)
        for name, records in by_file.items():
            try:
                st = os.lstat(directory / name)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # never read through links or from devices
            expected = checksums.get(name)
            if expected is not None:
                whole = st.st_size == expected.size
            else:  # saved without checksums: the records must fit
                whole = not record.checksum_files and st.st_size >= max(o + n for o, n, _ in records)
            if whole:
                intact.add(name)
                sizes[name] = st.st_size
        manifest = Manifest.read(directory)
    except (DataStatesError, OSError):
        return None
    return CopyInventory(str(directory), step, record.metadata_sha256, frozenset(referenced), frozenset(intact),
                         manifest.world_size if manifest else None, manifest.node if manifest else None, kind, sizes)


def step_directories(root: Path) -> list[Path]:
    """``step-N`` directories under ``root``, newest first."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    # real directories only: a link named step-N (to anywhere) is never read, pinned or pruned as a copy
    found = [(step_of(e.name), root / e.name) for e in entries
             if step_of(e.name) is not None and e.is_dir(follow_symlinks=False)]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


# -- pins and pruning ---------------------------------------------------------------------------------
def open_pin_file(directory: Path) -> int:
    """The pin file of a copy (created if missing): never through a link, a regular file only."""
    return _open_regular(directory / PIN_FILE, os.O_RDWR | os.O_CREAT, "remove it")


class Pin:
    """A shared ``flock`` on a local copy that a drain will read: pruning skips pinned copies."""

    def __init__(self, directory: Path) -> None:
        self.fd: int | None = open_pin_file(directory)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def prune(root: Path, keep: int, *, fsync: bool, upto_step: int | None = None) -> list[str]:
    """Delete committed copies under ``root`` beyond the newest ``keep`` up to ``upto_step``, and older leftovers.

    Never a pinned copy (a drain reads it), never one newer than ``upto_step`` (the step whose
    copies are known committed on its node and its partner: a newer one may be committed here
    only). ``.metadata`` goes first, so a crash midway leaves an incomplete copy, never a
    complete-looking one with files missing.
    """
    dirs = [d for d in step_directories(root) if upto_step is None or step_of(d.name) <= upto_step]  # type: ignore[operator]
    committed = [d for d in dirs if (d / METADATA_FILE).is_file()]
    if len(committed) <= keep:
        return []
    oldest_kept = step_of(committed[keep - 1].name)
    removed = []
    for directory in dirs:
        if step_of(directory.name) >= oldest_kept:  # type: ignore[operator]
            continue
        fd = None
        try:
            fd = open_pin_file(directory)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # type: ignore[arg-type]
            continue  # a drain reads it; the next prune removes it
        except OSError:
            if fd is not None:
                os.close(fd)
            continue
        try:
            (directory / METADATA_FILE).unlink(missing_ok=True)
            if fsync:
                fsync_directory(directory)
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory.name)
        finally:
            os.close(fd)
    return removed
