"""Opening data files for O_DIRECT writes, with a logged fallback where the file system refuses."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger("dcp_datastates")

#: A new file, never an existing one and never through a link (see ``dcp_datastates.dir_files``).
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class OpenedFile:
    fd: int
    path: str
    direct: bool
    #: The directory descriptor ``path``'s name was created in (``None``: ``path`` as given).
    dir_fd: int | None = None


def open_for_write(path: str, direct: bool, dir_fd: int | None = None) -> OpenedFile:
    """Create ``path`` (a name in ``dir_fd`` when given); O_DIRECT when asked and supported (tmpfs says EINVAL).

    The file must not exist: an existing file, or a link planted at the name, is ``FileExistsError``
    -- nothing is ever truncated or written through a link. It is created without O_DIRECT (a
    file system refusing O_DIRECT may refuse only after creating the file), then opened again
    with O_DIRECT and kept only if that is the very inode just created.
    """
    name = path if dir_fd is None else os.path.basename(path)
    at = {} if dir_fd is None else {"dir_fd": dir_fd}
    fd = os.open(name, _FLAGS, 0o644, **at)
    if not (direct and hasattr(os, "O_DIRECT")):
        return OpenedFile(fd, path, False, dir_fd)
    try:
        direct_fd = os.open(name, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                            **at)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            os.close(fd)
            raise
        logger.info("dcp_datastates: %s refuses O_DIRECT; using buffered writes", os.path.dirname(path))
        return OpenedFile(fd, path, False, dir_fd)
    created, reopened = os.fstat(fd), os.fstat(direct_fd)
    os.close(fd)
    if (created.st_dev, created.st_ino) != (reopened.st_dev, reopened.st_ino):
        os.close(direct_fd)
        raise FileExistsError(errno.EEXIST, "replaced right after it was created", path)
    return OpenedFile(direct_fd, path, True, dir_fd)
