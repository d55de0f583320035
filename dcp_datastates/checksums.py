"""Checksum side files: one JSON per rank next to the data files (the verify step's input).

Stock DCP never opens them, so checkpoints stay readable by ``FileSystemReader``; JSON
rather than pickle, so reading them can never execute code. Each data file is covered
by XXH64 checksums of consecutive ``block_bytes`` blocks (the last one may be short).

A side file can be deleted or edited, so it cannot vouch for itself: at commit the
writer records every side file's SHA-256 inside ``.metadata`` (see ``metadata_check``),
and readers open exactly the side files listed there. Whatever a side file holds is
validated against a strict schema before use: a power-of-two ``block_bytes`` in a sane
range, one checksum per block, sizes that fit in 64 bits -- so no number in the file
drives an allocation, a division by zero or a loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from dcp_datastates.errors import CorruptCheckpointError
from dcp_datastates.kernels import block_checksums

ALGORITHM = "xxh64"
CHECKSUM_FILE_SUFFIX = "checksums.json"
#: Smallest and largest checksum block the reader accepts (the writer uses 4 KiB .. 1 MiB).
MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = 512, 1 << 30
#: Largest data file a checksum entry may describe (64 PiB).
MAX_FILE_BYTES = 1 << 56
#: Largest side file read into memory: 17 bytes per 1 MiB block covers ~60 TiB of data.
MAX_CHECKSUM_FILE_BYTES = 1 << 30


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


def encode_checksum_file(files: dict[str, FileChecksums]) -> bytes:
    """A side file's bytes (the writer creates it through the directory's descriptor, see ``dir_files``)."""
    document = {
        "algorithm": ALGORITHM,
        "files": {
            name: {"size": fc.size, "block_bytes": fc.block_bytes, "blocks": [f"{b:016x}" for b in fc.blocks]}
            for name, fc in files.items()
        },
    }
    return json.dumps(document).encode()


# -- reading side files: strict schema ---------------------------------------------------------
_Hex16 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]


class _FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    size: int = Field(ge=0, le=MAX_FILE_BYTES)
    block_bytes: int = Field(ge=MIN_BLOCK_BYTES, le=MAX_BLOCK_BYTES)
    blocks: list[_Hex16]

    @model_validator(mode="after")
    def _consistent(self) -> "_FileEntry":
        if self.block_bytes & (self.block_bytes - 1):
            raise ValueError(f"block_bytes {self.block_bytes} is not a power of two")
        expected = math.ceil(self.size / self.block_bytes)
        if len(self.blocks) != expected:
            raise ValueError(
                f"{len(self.blocks)} block checksums for {self.size} bytes in blocks of {self.block_bytes} "
                f"(expected {expected})"
            )
        return self


class _ChecksumDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    algorithm: Literal["xxh64"]
    files: dict[str, _FileEntry]


def plain_file_name_problem(name: object) -> str | None:
    """Why ``name`` is not a bare file name inside the checkpoint directory (``None`` if it is)."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a file name"
    if not name or name in (".", ".."):
        return "is not a file name"
    if "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        return "is a path, not a plain file name of this checkpoint (it could point outside the directory)"
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        return "is longer than a file name can be"
    return None


def read_regular_file(path: Path, limit: int, what: str, dir_fd: int | None = None) -> bytes:
    """Bytes of ``path`` if it is a regular file (not a link, FIFO or directory) of at most ``limit`` bytes.

    With ``dir_fd``, ``path``'s name is opened in that directory (the one a save claimed).
    """
    at = {} if dir_fd is None else {"dir_fd": dir_fd}
    try:
        fd = os.open(path if dir_fd is None else path.name,
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), **at)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptCheckpointError(f"{what} {path} cannot be opened: {exc.strerror or exc} (is it a symbolic link?)") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptCheckpointError(f"{what} {path} is not a regular file")
        if info.st_size > limit:
            raise CorruptCheckpointError(f"{what} {path} is {info.st_size} bytes, more than the {limit} it can be")
        chunks, left = [], info.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_checksum_file(data: bytes, source: str) -> dict[str, FileChecksums]:
    """A side file's checksums, or :class:`CorruptCheckpointError` naming ``source`` and what is wrong."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"checksum file {source} is not valid JSON ({str(exc)[:200]}); it is damaged") from exc
    try:
        parsed = _ChecksumDocument.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise CorruptCheckpointError(
            f"checksum file {source} is malformed at {where}: {first['msg']} ({exc.error_count()} problem(s)); "
            "it is damaged"
        ) from exc
    out: dict[str, FileChecksums] = {}
    for name, entry in parsed.files.items():
        problem = plain_file_name_problem(name)
        if problem:
            raise CorruptCheckpointError(f"checksum file {source} names data file {name!r}, which {problem}")
        out[name] = FileChecksums(entry.size, entry.block_bytes, tuple(int(b, 16) for b in entry.blocks))
    return out


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checksums_of(data: bytes | memoryview, block_bytes: int) -> FileChecksums:
    return FileChecksums(len(data), block_bytes, tuple(block_checksums(data, block_bytes)))


def load_checksums(directory: Path) -> dict[str, FileChecksums]:
    """Every side file found in ``directory``, strictly parsed (no vouching: see ``metadata_check``).

    Kept for callers that only want what the side files say; readers use
    ``metadata_check.load_verified_checksums``, which opens only the files ``.metadata`` lists.
    """
    merged: dict[str, FileChecksums] = {}
    for entry in sorted(directory.glob(f"__*_{CHECKSUM_FILE_SUFFIX}")):
        merged |= parse_checksum_file(read_regular_file(entry, MAX_CHECKSUM_FILE_BYTES, "checksum file"), str(entry))
    return merged
