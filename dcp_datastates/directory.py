"""What a checkpoint id is for this backend: a local directory (shared by writer and reader)."""

from __future__ import annotations

import os
import re
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


# -- a root of checkpoints: step-N directories side by side ---------------------------------------
#: Recognized checkpoint directory names, ordered by the step number ``N``: ``step-N``, ``step_N``,
#: ``stepN`` and a bare ``N`` (torchtitan and our examples use ``step-N``).
STEP_NAME_PATTERNS = (re.compile(r"^step[-_]?(\d+)$"), re.compile(r"^(\d+)$"))


def step_of(name: str) -> int | None:
    """The step number a checkpoint directory's name encodes, or ``None`` if it is not a step name."""
    for pattern in STEP_NAME_PATTERNS:
        match = pattern.match(name)
        if match:
            return int(match.group(1))
    return None


def step_directories(root: Path) -> list[Path]:
    """Sub-directories of ``root`` with a step name, oldest step first (names only: nothing is opened)."""
    found = []
    for child in root.iterdir():
        step = step_of(child.name)
        if step is not None and child.is_dir():
            found.append((step, child.name, child))
    return [path for _, _, path in sorted(found)]
