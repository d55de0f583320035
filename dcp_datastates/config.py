"""User-facing configuration of the DataStates checkpoint backend.

One pydantic model, validated when it is built, so that a wrong value fails at
construction time with a message naming the field -- not halfway through a save.
Sizes accept plain integers (bytes) or strings such as ``"512MiB"`` / ``"2GiB"``.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretBytes, field_validator, model_validator

from dcp_datastates.integrity import KEY_ENV, MIN_KEY_BYTES

from dcp_datastates.tiers import MultiLevelConfig

#: O_DIRECT needs buffers, offsets and lengths aligned to the logical block size.
#: 4096 covers every device we know of (512e and 4Kn disks, NVMe, ext4/xfs).
DIRECT_IO_ALIGNMENT = 4096
#: Preferred checksum block: small enough to locate corruption, large enough to cost nothing.
CHECKSUM_BLOCK_BYTES = 1024**2

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, field: str) -> int:
    """Turn ``"512MiB"``-style sizes into bytes; reject what cannot be understood."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a size in bytes (e.g. 33554432 or '32MiB'), got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _UNITS:
            return int(match.group(1)) * _UNITS[match.group(2).lower()]
    raise ValueError(
        f"{field} must be a size in bytes (e.g. 33554432 or '32MiB'; units: KiB, MiB, GiB, KB, MB, GB), got {value!r}"
    )


class DataStatesConfig(BaseModel):
    """How a :class:`~dcp_datastates.DataStatesWriter` stages and writes checkpoints.

    The defaults suit one process per GPU on a node with tens of GiB of host memory.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    io_engine: Literal["auto", "io_uring", "threads"] = Field(
        "auto",
        description="Which engine writes bulk tensor bytes. 'io_uring' uses the kernel's async ring with "
        "O_DIRECT; 'threads' uses a pool of os.pwrite workers; 'auto' tries io_uring and falls back to "
        "threads (logging why) where io_uring cannot be set up (kernel.io_uring_disabled, seccomp).",
    )
    io_threads: int = Field(
        4, ge=1, le=256, description="Worker threads of the 'threads' engine (in-flight pwrite calls)."
    )
    queue_depth: int = Field(
        8, ge=1, le=4096, description="Most writes in flight at once in the io_uring engine."
    )
    chunk_bytes: int = Field(
        32 * 1024**2,
        description="Size of one host staging buffer and so of one write call. Must be a multiple of 4096 "
        "(the O_DIRECT alignment).",
    )
    host_pool_bytes: int | Literal["auto"] = Field(
        "auto",
        description="Total host memory of the staging buffer pool (pinned where CUDA is available), allocated "
        "once per process, filled (faulted in, pinned) on a background thread and reused across checkpoints. "
        "'auto' sizes it to this rank's checkpoint bytes on the first save, capped by half the available host "
        "memory (MemAvailable, or the cgroup's limit) split between the node's ranks (LOCAL_WORLD_SIZE), grows "
        "it within that cap if the state grows, and logs the size and why; a state that cannot fit streams "
        "through it. An explicit size is used as given (a larger state streams through it chunk by chunk) and "
        "must hold at least two chunks so copying overlaps writing.",
    )
    direct_io: bool = Field(
        True,
        description="Open data files with O_DIRECT (bypassing the page cache). Falls back to buffered "
        "I/O, with a log line, on file systems that refuse O_DIRECT (tmpfs).",
    )
    fsync: bool = Field(
        True,
        description="fsync data files, the metadata file and the directory before a checkpoint is "
        "declared complete. Turning it off trades crash safety for speed.",
    )

    checksums: bool = Field(
        True,
        description="Compute XXH64 checksums of every data-file block while staging and store them in a "
        "per-rank side file (stock DCP ignores it); DataStatesReader and `dcp-datastates verify` check them.",
    )
    multilevel: MultiLevelConfig | None = Field(
        None,
        description="Multi-level checkpoints (docs/multilevel.md): commit to a node-local directory first, keep a "
        "partner copy on another node, drain to the checkpoint_id (shared path) in the background. None: "
        "every save goes straight to the checkpoint_id.",
    )

    # -- integrity policy and keyed seal (docs/integrity.md) ------------------------------------------
    integrity: Literal["if-present", "required"] = Field(
        "if-present",
        description="What a load or `verify` demands. 'if-present': a seal, where there is one, must match; "
        "checkpoints without one (stock DCP) load unverified. 'required': refuse any checkpoint not verified "
        "end to end (no seal, saved without checksums, a data file without checksums).",
    )
    integrity_key: SecretBytes | None = Field(
        None,
        description=f"Key (at least {MIN_KEY_BYTES} bytes) of the HMAC-SHA256 seal: a writer seals with it, a "
        "reader refuses checkpoints not sealed with it (it implies integrity='required'). Defaults to the "
        f"{KEY_ENV} environment variable; pass None explicitly to ignore that variable. Never printed.",
    )

    @model_validator(mode="before")
    @classmethod
    def _key_from_environment(cls, data: Any) -> Any:
        if isinstance(data, dict) and "integrity_key" not in data and os.environ.get(KEY_ENV) is not None:
            value = os.environ[KEY_ENV]
            if len(value.encode()) < MIN_KEY_BYTES:
                raise ValueError(
                    f"the {KEY_ENV} environment variable holds {len(value.encode())} bytes; an integrity key must "
                    f"have at least {MIN_KEY_BYTES} (e.g. python -c 'import secrets; print(secrets.token_hex(32))'), "
                    "or unset the variable to save and load without a key"
                )
            data = {**data, "integrity_key": value}
        return data

    @field_validator("integrity_key")
    @classmethod
    def _key_long_enough(cls, value: SecretBytes | None) -> SecretBytes | None:
        if value is not None and len(value.get_secret_value()) < MIN_KEY_BYTES:
            raise ValueError(
                f"integrity_key must have at least {MIN_KEY_BYTES} bytes, got {len(value.get_secret_value())} "
                "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return value

    @model_validator(mode="after")
    def _required_needs_checksums(self) -> "DataStatesConfig":
        if self.checksums is False and (self.integrity == "required" or self.integrity_key is not None):
            raise ValueError(
                "checksums=False saves checkpoints that cannot be verified end to end, which "
                "integrity='required' and an integrity_key refuse to load; keep checksums=True"
            )
        return self

    @field_validator("chunk_bytes", "host_pool_bytes", mode="before")
    @classmethod
    def _parse_sizes(cls, value: int | str, info) -> int | str:  # type: ignore[no-untyped-def]
        if info.field_name == "host_pool_bytes" and isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            size = parse_size(value, info.field_name)
        except ValueError as exc:
            if info.field_name == "host_pool_bytes":
                raise ValueError(f"{exc}; or 'auto' to size the pool to the state") from None
            raise
        if size <= 0:
            raise ValueError(f"{info.field_name} must be a positive number of bytes, got {size}")
        return size

    @field_validator("chunk_bytes")
    @classmethod
    def _chunk_aligned(cls, value: int) -> int:
        if value % DIRECT_IO_ALIGNMENT:
            raise ValueError(
                f"chunk_bytes must be a multiple of {DIRECT_IO_ALIGNMENT} for O_DIRECT, got {value}; "
                f"try {max(DIRECT_IO_ALIGNMENT, value // DIRECT_IO_ALIGNMENT * DIRECT_IO_ALIGNMENT)}"
            )
        return value

    @model_validator(mode="after")
    def _pool_holds_two_chunks(self) -> "DataStatesConfig":
        if self.host_pool_bytes != "auto" and self.host_pool_bytes < 2 * self.chunk_bytes:
            raise ValueError(
                f"host_pool_bytes ({self.host_pool_bytes}) must be at least 2 * chunk_bytes "
                f"({2 * self.chunk_bytes}) so that staging overlaps writing; raise host_pool_bytes, "
                "lower chunk_bytes, or use host_pool_bytes='auto'"
            )
        return self

    @property
    def checksum_block_bytes(self) -> int:
        """Checksum granularity: 1 MiB, or less when chunks are smaller (it must divide a chunk)."""
        return math.gcd(self.chunk_bytes, CHECKSUM_BLOCK_BYTES)

    @property
    def pool_buffers(self) -> int | None:
        """Number of chunk-sized buffers in the host pool; None for 'auto' (sized at the first save)."""
        if self.host_pool_bytes == "auto":
            return None
        return self.host_pool_bytes // self.chunk_bytes
