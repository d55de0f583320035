"""Opening data files for O_DIRECT writes, with a logged fallback where the file system refuses."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger("dcp_datastates")


@dataclass(frozen=True)
class OpenedFile:
    fd: int
    path: str
    direct: bool


def open_for_write(path: str, direct: bool) -> OpenedFile:
    """Create/truncate ``path``; O_DIRECT when asked and supported (tmpfs says EINVAL)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return OpenedFile(os.open(path, flags | os.O_DIRECT, 0o644), path, True)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            logger.info("dcp_datastates: %s refuses O_DIRECT; using buffered writes", os.path.dirname(path))
    return OpenedFile(os.open(path, flags, 0o644), path, False)
