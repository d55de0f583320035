"""A save's claim on its checkpoint directory: which directory it is, and that no one else writes there.

Two things go wrong when a save is not alone with its directory:

* **The directory is removed (or replaced) mid-save.** Writes into open files still
  succeed -- into unlinked inodes -- and a commit that re-created the path would publish
  a ``.metadata`` pointing at nothing. So the directory's identity (device, inode) is
  recorded when the save starts, the directory is never created again afterwards, and
  the commit works through a descriptor of *that* directory (see ``commit.py``).
* **Two saves write into one directory.** Each one's commit deletes the data files it
  does not reference -- the other's. So the coordinator takes an exclusive ``flock`` on a
  lock file in the directory from the start of the save until its commit ends or fails;
  the second save is refused with :class:`CheckpointBusyError` naming the first. A
  ``flock`` belongs to the open file, so it dies with the process: a SIGKILLed save never
  leaves a stale lock (the file may stay; it is empty of meaning without the lock).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from dcp_datastates.dir_files import CheckpointDir
from dcp_datastates.errors import CheckpointBusyError, CheckpointDirectoryChangedError, CheckpointPathError

LOCK_FILE = ".dcp_datastates.lock"


@dataclass(frozen=True)
class DirectoryIdentity:
    """The directory a save started in: its path and the inode that path named then."""

    path: Path
    device: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> "DirectoryIdentity":
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise cls(path, -1, -1).changed("was removed") from None
        return cls(path, st.st_dev, st.st_ino)

    def open(self) -> int:
        """A descriptor of this very directory; fails if the path was removed or now names another one."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise self.changed("was removed") from None
        except NotADirectoryError:
            raise self.changed("was replaced by a file") from None
        except PermissionError as exc:
            raise CheckpointPathError(f"cannot open checkpoint directory {str(self.path)!r}: permission denied") from exc
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (self.device, self.inode):
            os.close(fd)
            raise self.changed("was removed and created again")
        return fd

    def check(self) -> None:
        os.close(self.open())

    def open_dir(self) -> CheckpointDir:
        """This very directory as a :class:`CheckpointDir`: every file a save creates goes through it."""
        return CheckpointDir(self.open(), self.path)

    def changed(self, what: str) -> CheckpointDirectoryChangedError:
        return CheckpointDirectoryChangedError(
            f"checkpoint directory {str(self.path)!r} {what} while a save into it was running; the save "
            "is not committed (its .metadata would point at files that are gone). The previous checkpoint, "
            "if it lives elsewhere, is untouched; save again into a directory nothing else removes."
        )


class DirectoryLock:
    """Exclusive ``flock`` on ``LOCK_FILE`` inside a checkpoint directory, naming its holder."""

    def __init__(self, identity: DirectoryIdentity, holder_id: str | None = None) -> None:
        self.identity = identity
        self.path = identity.path / LOCK_FILE
        #: Names this save in the lock file and in a refused save's error (random: says nothing of file names).
        self.holder_id = holder_id or secrets.token_hex(6)
        self._fd: int | None = None
        self._dir_fd: int | None = None
        self._lock = threading.Lock()

    def acquire(self) -> None:
        dir_fd = self.identity.open()
        try:
            self._acquire(dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        self._dir_fd = dir_fd

    def _acquire(self, dir_fd: int) -> None:
        for _ in range(16):  # retried only while a releasing holder unlinks the file under us
            fd = self._open(dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._busy(holder) from None
            except BaseException:
                os.close(fd)
                raise
            # We hold a lock on the inode we opened; it counts only if the name still names it.
            if _same_file(fd, dir_fd):
                holder = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "holder": self.holder_id,
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                }
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode(), 0)
                self._fd = fd
                return
            os.close(fd)
        raise CheckpointBusyError(f"could not lock {self.path}: it keeps being replaced by another save")

    def _open(self, dir_fd: int) -> int:
        """The lock file, created or reused -- but only a regular file with one link, never through a link."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(LOCK_FILE, flags, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise self.identity.changed("was removed") from None
            kind = {errno.ELOOP: "a symbolic link", errno.EISDIR: "a directory",
                    errno.ENXIO: "a socket or device"}.get(exc.errno or 0)
            raise self._unusable(f"is {kind}" if kind else f"cannot be opened ({exc.strerror})") from exc
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = "is a FIFO" if stat.S_ISFIFO(info.st_mode) else "is not a regular file"
        elif info.st_nlink != 1:
            problem = f"has {info.st_nlink} hard links (one may be a file outside the checkpoint)"
        if problem:
            os.close(fd)
            raise self._unusable(problem)
        return fd

    def _unusable(self, problem: str) -> CheckpointPathError:
        return CheckpointPathError(
            f"cannot lock checkpoint directory {str(self.identity.path)!r}: its lock file {self.path} {problem}. "
            "A save never writes through such an entry, so this one was refused and wrote nothing. Something "
            f"other than dcp_datastates put it there: remove it (rm {self.path}) and make sure only you can "
            "write into the checkpoint directory."
        )

    def release(self) -> None:
        """Unlink the lock file (while still holding the lock), then drop the lock. Idempotent."""
        with self._lock:
            fd, self._fd = self._fd, None
            dir_fd, self._dir_fd = self._dir_fd, None
        if fd is None:
            return
        try:
            if dir_fd is not None and _same_file(fd, dir_fd):
                os.unlink(LOCK_FILE, dir_fd=dir_fd)  # a waiter that opened it re-checks the name after locking
        except OSError:
            pass  # the directory is gone: nothing to clean
        finally:
            os.close(fd)  # releases the flock
            if dir_fd is not None:
                os.close(dir_fd)

    def _busy(self, holder: dict) -> CheckpointBusyError:
        directory = str(self.path.parent)
        if holder:
            who = (
                f"pid {holder.get('pid')} on host {holder.get('host')!r}, holder id {holder.get('holder')!r}, "
                f"started {holder.get('started')}"
            )
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                who += " -- this very process: an earlier save into this directory is still running"
        else:
            who = "a save that is just starting"
        return CheckpointBusyError(
            f"another save is writing into checkpoint directory {directory!r} ({who}). Two saves into one "
            "directory would delete each other's files; this one was refused and changed nothing. Wait for "
            "the other save to finish (its upload_completion), or save into another directory."
        )


@dataclass
class SaveClaim:
    """What a save holds from its start to the end of its commit."""

    identity: DirectoryIdentity
    lock: DirectoryLock | None  # the coordinator's; None on other ranks
    from_stage: bool  # started by AsyncStager.stage(), before DCP's own planning
    confirmed: bool = False  # DCP's prepare_local_plan has seen it
    relock_holder: str | None = None  # handed over by pickling: take the lock again under this holder id
    finalizer: "weakref.finalize | None" = field(default=None, repr=False)  # releases it if the writer is dropped
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            if self.lock is not None:
                self.lock.release()
            if self.finalizer is not None:
                self.finalizer.detach()

    def take_lock_again(self) -> None:
        """In the process a claim was shipped to: lock the directory for the rest of the save."""
        if self.relock_holder is not None and self.lock is None:
            self.lock = DirectoryLock(self.identity, self.relock_holder)
            self.lock.acquire()
            self.relock_holder = None

    def __getstate__(self) -> dict:
        """Pickling hands the claim to another process (``AsyncCheckpointerType.PROCESS``).

        A lock belongs to an open file of this process, so it cannot travel: it is released
        here and taken again by the receiving process in ``prepare_local_plan``.
        """
        state = dict(self.__dict__)
        lock = state.pop("lock")
        state["lock"], state["finalizer"] = None, None
        if lock is not None and not self._released:
            state["relock_holder"] = lock.holder_id
            lock.release()
        return state


def _same_file(fd: int, dir_fd: int) -> bool:
    """Whether ``LOCK_FILE`` in ``dir_fd`` (not following a link) is the file open as ``fd``."""
    try:
        named = os.stat(LOCK_FILE, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
