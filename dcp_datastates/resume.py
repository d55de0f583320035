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
"""

from __future__ import annotations

import re
from pathlib import Path

from dcp_datastates.errors import DataStatesError
from dcp_datastates.integrity import IntegrityPolicy
from dcp_datastates.metadata_check import data_file_problems, load_verified_checksums, read_checkpoint_metadata

STEP_NAME_PATTERNS = (re.compile(r"^step[-_]?(\d+)$"), re.compile(r"^(\d+)$"))


def step_of(name: str) -> int | None:
    """The step number a checkpoint directory's name encodes, or ``None`` if it is not a step name."""
    for pattern in STEP_NAME_PATTERNS:
        match = pattern.match(name)
        if match:
            return int(match.group(1))
    return None


def is_intact_checkpoint(path: str | Path, *, trust: bool = False, policy: IntegrityPolicy | None = None) -> bool:
    """Whether ``path`` holds a checkpoint that parses and whose files are all there at their sizes.

    Under a ``policy`` that demands verification (``integrity='required'`` or a key; default:
    ``IntegrityPolicy.default()``), it must also be one that policy would load.
    """
    path = Path(path)
    policy = policy or IntegrityPolicy.default()
    try:
        metadata = read_checkpoint_metadata(path, trust=trust)
        checksums = load_verified_checksums(path, metadata, policy)
        if policy.enforced and checksums.unverified:
            return False
        return not checksums.problems and not data_file_problems(path, metadata, checksums.files)
    except (DataStatesError, OSError):
        return False


def list_complete_checkpoints(root: str | Path, *, trust: bool = False, policy: IntegrityPolicy | None = None) -> list[Path]:
    """Intact checkpoint directories under ``root`` with a recognized step name, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    policy = policy or IntegrityPolicy.default()
    found = []
    for child in root.iterdir():
        step = step_of(child.name)
        if step is not None and child.is_dir() and is_intact_checkpoint(child, trust=trust, policy=policy):
            found.append((step, child.name, child))
    return [path for _, _, path in sorted(found)]


def latest_complete_checkpoint(root: str | Path, *, trust: bool = False, policy: IntegrityPolicy | None = None) -> Path | None:
    """The intact checkpoint with the highest step under ``root`` (``None`` if there is none)."""
    complete = list_complete_checkpoints(root, trust=trust, policy=policy)
    return complete[-1] if complete else None
