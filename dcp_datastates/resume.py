"""Finding the checkpoint to resume from: the newest *complete*, *intact* one.

A checkpoint directory counts only if its ``.metadata`` exists (see ``commit.py``), parses
safely and passes the structure check (``metadata_check``), the checksum files it vouches
for are intact, and every data file it references exists with the size the records and
checksums imply. So a save that died halfway, a zero-length ``.metadata`` or a directory
whose data files are gone is skipped, never half-loaded. (Data bytes are not hashed here;
the load does that.)

Recognized names (:data:`STEP_NAME_PATTERNS`), ordered by the step number ``N``:
``step-N``, ``step_N``, ``stepN`` and a bare ``N`` (torchtitan and our examples use
``step-N``). Anything else -- ``backup-2024``, ``latest``, ``step-3.tmp`` -- is not a step
and is skipped.

The root itself must exist: a typo in it would otherwise read as "no checkpoint yet" and
silently restart training from scratch. An existing root without a complete checkpoint
is the first run -- ``latest_complete_checkpoint`` returns ``None``: start fresh.
"""

from __future__ import annotations

import os
from pathlib import Path

from dcp_datastates.directory import STEP_NAME_PATTERNS, step_directories, step_of  # noqa: F401 - re-exported
from dcp_datastates.errors import CheckpointPathError
from dcp_datastates.integrity import IntegrityPolicy
from dcp_datastates.metadata_check import is_intact_checkpoint  # noqa: F401 - re-exported


def _existing_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.exists():
        raise CheckpointPathError(
            f"checkpoint root {str(root)!r} does not exist. Create it before the first run (e.g. "
            f"Path({str(root)!r}).mkdir(parents=True, exist_ok=True)); an existing root without a complete "
            "checkpoint means a first run: latest_complete_checkpoint returns None and training starts fresh."
        )
    if not root.is_dir():
        raise CheckpointPathError(
            f"checkpoint root {str(root)!r} is a file; pass the directory that holds the step-N checkpoint directories"
        )
    return root


def list_complete_checkpoints(
    root: str | os.PathLike, *, trust: bool = False, policy: IntegrityPolicy | None = None
) -> list[Path]:
    """Intact checkpoint directories under ``root`` with a recognized step name, oldest step first.

    Raises :class:`CheckpointPathError` if ``root`` does not exist or is a file.
    """
    return [path for path in step_directories(_existing_root(root))
            if is_intact_checkpoint(path, trust=trust, policy=policy)]


def latest_complete_checkpoint(
    root: str | os.PathLike, *, trust: bool = False, policy: IntegrityPolicy | None = None
) -> Path | None:
    """The intact checkpoint with the highest step under ``root``; ``None`` if it holds none yet (start fresh).

    Checks from the newest step down and stops at the first intact one. Raises
    :class:`CheckpointPathError` if ``root`` does not exist or is a file.
    """
    for path in reversed(step_directories(_existing_root(root))):
        if is_intact_checkpoint(path, trust=trust, policy=policy):
            return path
    return None
