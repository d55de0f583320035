"""What a checkpoint id is for this backend: a local directory (shared by writer and reader)."""

from __future__ import annotations

import os
from pathlib import Path

#: The file whose presence makes a checkpoint directory complete (DCP's name, stock and ours).
METADATA_FILE = ".metadata"


def validate_directory_id(checkpoint_id: str | os.PathLike) -> bool:
    """A local path whose nearest existing ancestor is writable (same rule as stock DCP)."""
    if isinstance(checkpoint_id, Path):
        return True
    if "://" in str(checkpoint_id):
        return False
    return any(p.exists() and os.access(p, os.W_OK) for p in Path(checkpoint_id).parents)


class DirectoryCheckpointId:
    """``checkpoint_id`` plumbing of DCP storage classes whose checkpoint is ``self.path``."""

    path: Path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return validate_directory_id(checkpoint_id)

    @property
    def checkpoint_id(self) -> Path:
        return self.path
