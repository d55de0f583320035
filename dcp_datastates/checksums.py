"""Checksum side files: one JSON per rank next to the data files (the verify step's input).

Stock DCP never opens them, so checkpoints stay readable by ``FileSystemReader``; JSON
rather than pickle, so reading them can never execute code. Each data file is covered
by XXH64 checksums of consecutive ``block_bytes`` blocks (the last one may be short).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from dcp_datastates.kernels import block_checksums

ALGORITHM = "xxh64"
CHECKSUM_FILE_SUFFIX = "checksums.json"


@dataclass(frozen=True)
class FileChecksums:
    size: int
    block_bytes: int
    blocks: tuple[int, ...]

    def bad_blocks(self, data: memoryview, start: int) -> list[int]:
        """Indexes of the blocks of ``data`` (file bytes from ``start``, block-aligned) that differ."""
        first = start // self.block_bytes
        actual = block_checksums(data, self.block_bytes)
        return [
            first + i
            for i, value in enumerate(actual)
            if first + i >= len(self.blocks) or self.blocks[first + i] != value
        ]


def keys_overlapping(records: list[tuple[int, int, str]], start: int, end: int) -> list[str]:
    """Keys of the ``(offset, length, key)`` records with a byte in ``[start, end)``: who a bad block hurts."""
    return sorted({key for offset, length, key in records if offset < end and offset + length > start})


def checksum_file_name(file_prefix: str) -> str:
    return f"{file_prefix}{CHECKSUM_FILE_SUFFIX}"


def write_checksum_file(path: Path, files: dict[str, FileChecksums], fsync: bool) -> None:
    document = {
        "algorithm": ALGORITHM,
        "files": {
            name: {"size": fc.size, "block_bytes": fc.block_bytes, "blocks": [f"{b:016x}" for b in fc.blocks]}
            for name, fc in files.items()
        },
    }
    with open(path, "w") as f:
        json.dump(document, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def load_checksums(directory: Path) -> dict[str, FileChecksums]:
    """Every data file's checksums, merged from all ranks' side files."""
    merged: dict[str, FileChecksums] = {}
    for entry in sorted(directory.glob(f"__*_{CHECKSUM_FILE_SUFFIX}")):
        document = json.loads(entry.read_text())
        if document.get("algorithm") != ALGORITHM:
            raise ValueError(f"{entry}: unknown checksum algorithm {document.get('algorithm')!r}")
        for name, fc in document["files"].items():
            merged[name] = FileChecksums(fc["size"], fc["block_bytes"], tuple(int(b, 16) for b in fc["blocks"]))
    return merged


def checksums_of(data: bytes | memoryview, block_bytes: int) -> FileChecksums:
    return FileChecksums(len(data), block_bytes, tuple(block_checksums(data, block_bytes)))
