"""Finding the checkpoint to resume from: the newest *complete* one.

A checkpoint directory is complete exactly when its ``.metadata`` exists (see
``commit.py``), so a save that died halfway is skipped, never half-loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from dcp_datastates.commit import has_complete_checkpoint

_STEP_RE = re.compile(r"(\d+)$")


def list_complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``root`` named ``<prefix><step>``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.search(child.name)
        if match and child.is_dir() and has_complete_checkpoint(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_complete_checkpoint(root: str | Path) -> Path | None:
    complete = list_complete_checkpoints(root)
    return complete[-1] if complete else None
