"""Files a save creates in its checkpoint directory: never through a link, never reusing one.

Anyone who can write into a checkpoint directory can plant a symbolic link (or a hard
link, a FIFO, a directory) at a name a save is about to use. Opening that name the
ordinary way (``open(path, "wb")``, ``O_CREAT|O_TRUNC``) would truncate and overwrite
whatever the link points at -- a file outside the checkpoint -- and ``os.rename`` would
silently replace whatever sits at the target name. So every file a save creates goes
through a :class:`CheckpointDir`, an open descriptor of the directory the save claimed:

- created with ``O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC`` relative to that descriptor, so an
  existing entry of any kind at the name -- a dangling link included -- fails the save
  with :class:`CheckpointDirectoryChangedError` naming it, and nothing is written through
  it; a directory removed mid-save fails the same way, never with a raw ``OSError``;
- renamed with ``renameat2(RENAME_NOREPLACE)`` (or ``link`` + ``unlink`` where the kernel
  or file system lacks it), so a rename never replaces an entry someone put there;
- checked, once written, to be still linked under its name in that very directory.

The one exception is the directory lock (``save_claim``), which must be shared by every
save into the directory; it is opened without following links and checked after opening.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dcp_datastates.errors import CheckpointDirectoryChangedError, CheckpointIOError

#: Flags of every file a save creates (``O_WRONLY`` added by :meth:`CheckpointDir.create`).
CREATE_FLAGS = os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_RENAME_NOREPLACE = 1


class CheckpointDir:
    """An open descriptor of a save's checkpoint directory (see the module docstring)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "CheckpointDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- creating --------------------------------------------------------------------------------
    @contextmanager
    def creating(self, name: str) -> Iterator[None]:
        """Turn the ``OSError`` of creating ``name`` into our typed errors, naming the file."""
        try:
            yield
        except OSError as exc:
            raise self.creation_error(name, exc) from exc

    def creation_error(self, name: str, exc: OSError) -> CheckpointIOError:
        where = self.path / name
        if exc.errno in (errno.EEXIST, errno.ELOOP, errno.EISDIR):
            return CheckpointDirectoryChangedError(
                f"cannot create {where}: something already exists at that name (a file or link put there while "
                "the save ran?). A save never writes through an existing entry, so it was refused and nothing "
                "was written through it; the previous checkpoint is untouched. Remove it and save again, into a "
                "directory only you can write to."
            )
        if exc.errno == errno.ENOENT:
            return self.removed()
        return CheckpointIOError(exc.errno or errno.EIO, f"cannot create {where}: {exc.strerror or exc}")

    def removed(self) -> CheckpointDirectoryChangedError:
        return CheckpointDirectoryChangedError(
            f"checkpoint directory {str(self.path)!r} was removed while a save into it was running; the save is "
            "not committed (its .metadata would point at files that are gone). Save again into a directory "
            "nothing else removes."
        )

    def create(self, name: str, flags: int = os.O_WRONLY, mode: int = 0o644) -> int:
        """A descriptor of a new file ``name`` (``flags`` plus :data:`CREATE_FLAGS`); typed errors."""
        with self.creating(name):
            return os.open(name, flags | CREATE_FLAGS, mode, dir_fd=self.fd)

    def write_new(self, name: str, data: bytes | bytearray | memoryview, fsync: bool) -> None:
        """Create ``name`` holding exactly ``data``; durable with ``fsync``; still linked when it returns."""
        self.write_into(self.create(name), name, data, fsync)

    def write_into(self, fd: int, name: str, data: bytes | bytearray | memoryview, fsync: bool) -> None:
        """Write ``data`` into the new file ``fd`` (created as ``name``), fsync, check it is linked, close it."""
        try:
            view = memoryview(data).cast("B")
            done = 0
            try:
                while done < len(view):
                    done += os.write(fd, view[done : done + (1 << 26)])
                if fsync:
                    os.fsync(fd)
            except OSError as exc:
                raise CheckpointIOError(exc.errno or errno.EIO, f"cannot write {self.path / name}: {exc.strerror or exc}") from exc
            self.check_linked(fd, name)
        finally:
            os.close(fd)

    # -- after writing ---------------------------------------------------------------------------
    def check_linked(self, fd: int, name: str) -> None:
        """Fail unless ``fd`` is still the file ``name`` names in this directory (not unlinked, not replaced)."""
        check_still_linked(fd, name, self.fd, str(self.path / name))

    def rename_new(self, old: str, new: str) -> None:
        """Rename ``old`` to ``new`` in this directory; never replaces an existing ``new``."""
        if old == new:
            return
        try:
            _rename_noreplace(self.fd, old, new)
        except OSError as exc:
            raise self.creation_error(new, exc) from exc

    def remove(self, name: str, inode: tuple[int, int] | None = None) -> None:
        """Unlink ``name`` if it is there (a link is removed, never followed).

        With ``inode`` (device, inode), only if ``name`` still names that file: an entry someone
        put in place of ours is left alone.
        """
        try:
            if inode is not None:
                info = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
                if (info.st_dev, info.st_ino) != inode:
                    return
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def is_regular(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False


def only_ours(info: os.stat_result) -> bool:
    """Whether cleanup may unlink the file ``info`` describes: regular, with one name. We never make
    hard links, so a second name means someone linked it (over our name, or to keep it): not only ours."""
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1


def check_still_linked(fd: int, name: str, dir_fd: int | None = None, shown: str | None = None) -> None:
    """Fail if the file written through ``fd`` is no longer what ``name`` (in ``dir_fd``) names.

    ``rm -rf`` of the checkpoint directory mid-save does not stop writes into open files:
    they land in unlinked inodes, and a commit would publish ``.metadata`` for files that
    do not exist. Checked after the data is durable, right before the rank reports it.
    """
    written = os.fstat(fd)
    replaced = written.st_nlink == 0
    if not replaced:
        try:
            named = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            replaced = True
        else:
            replaced = (named.st_dev, named.st_ino) != (written.st_dev, written.st_ino)
    if replaced:
        raise CheckpointDirectoryChangedError(
            f"{shown or name} was removed or replaced while this checkpoint was being written (was the "
            "checkpoint directory deleted, or is another job saving into it?); the save is not committed. "
            "Save again into a directory nothing else touches."
        )


def _renameat2() -> object | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()
#: errnos meaning "this kernel or file system has no RENAME_NOREPLACE": fall back to link + unlink.
_NO_RENAMEAT2 = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


def _rename_noreplace(dir_fd: int, old: str, new: str) -> None:
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(dir_fd, os.fsencode(old), dir_fd, os.fsencode(new), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in _NO_RENAMEAT2:
            raise OSError(code, os.strerror(code), new)
    # link() fails with EEXIST rather than replace; the old name is dropped only once the new one exists
    os.link(old, new, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    os.unlink(old, dir_fd=dir_fd)
