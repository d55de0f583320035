"""Stock ``FileSystemWriter``'s keyword arguments, accepted by ``DataStatesWriter`` as a drop-in.

A job that swaps ``FileSystemWriter(path, sync_files=False, thread_count=8)`` for
``DataStatesWriter(path, ...)`` should keep working and mean the same thing. Each argument
either maps onto our machinery (``sync_files`` -> ``fsync``, ``thread_count`` ->
``io_threads``), or is accepted because our design always does what it asks
(``single_file_per_rank=True``, ``cache_staged_state_dict``, ``per_thread_copy_ahead``:
see each field), or is refused with a fix where ours cannot do it (a file per tensor,
safetensors, write-side stream transforms) -- never silently ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch.distributed.checkpoint.filesystem import SerializationFormat

from dcp_datastates.config import DataStatesConfig
from dcp_datastates.errors import InvalidOptionError


class FileSystemWriterOptions(BaseModel):
    """``FileSystemWriter``'s arguments as ``DataStatesWriter`` understands them (defaults: stock's)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    single_file_per_rank: bool = Field(
        True,
        description="Accepted as True: a rank's tensors always go to one data file (objects to a second one). "
        "False (a file per tensor) is refused: our write path streams a rank's tensors as one file.",
    )
    sync_files: bool | None = Field(
        None, description="Stock's name for DataStatesConfig.fsync: fsync data, .metadata and the directory."
    )
    thread_count: int | None = Field(
        None, ge=1, le=256, description="Stock's I/O thread count: sets DataStatesConfig.io_threads (the pwrite engine's workers)."
    )
    per_thread_copy_ahead: int = Field(
        10_000_000,
        ge=0,
        description="Accepted, no effect: how far device copies run ahead of the disk is bounded by the staging "
        "pool (DataStatesConfig.host_pool_bytes), which copies and writes overlap through.",
    )
    cache_staged_state_dict: bool = Field(
        False,
        description="Accepted, either value: our staging memory (the pinned host pool) is always allocated once "
        "per process and reused by every later save and writer, which is what stock's True asks for.",
    )
    serialization_format: SerializationFormat = Field(
        SerializationFormat.TORCH_SAVE, description="Only TORCH_SAVE: our records are torch.save containers."
    )
    extensions: Sequence[Any] | None = Field(
        None, description="Stock's experimental write-side stream transforms (_extensions): only None or empty."
    )

    @field_validator("single_file_per_rank", "sync_files", "cache_staged_state_dict", mode="before")
    @classmethod
    def _strict_bool(cls, value: object, info: Any) -> object:
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"must be True or False, got {type(value).__name__} {value!r}")
        if info.field_name == "single_file_per_rank" and value is False:
            raise ValueError(
                "False (one file per tensor) is not something DataStatesWriter does: it streams each rank's "
                "tensors into one data file. Drop single_file_per_rank=False (stock FileSystemReader reads "
                "either layout), or use FileSystemWriter where a file per tensor is required"
            )
        return value

    @field_validator("thread_count", "per_thread_copy_ahead", mode="before")
    @classmethod
    def _strict_int(cls, value: object) -> object:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"must be an integer, got {type(value).__name__} {value!r}")
        return value

    @field_validator("serialization_format", mode="before")
    @classmethod
    def _torch_save_only(cls, value: object) -> object:
        if value != SerializationFormat.TORCH_SAVE:
            raise ValueError(
                f"only SerializationFormat.TORCH_SAVE is supported, got {value!r}: DataStatesWriter writes "
                "torch.save records (readable by stock FileSystemReader); use FileSystemWriter for safetensors"
            )
        return value

    @field_validator("extensions", mode="before")
    @classmethod
    def _no_extensions(cls, value: object) -> object:
        if value:
            raise ValueError(
                "write-side stream transforms are not supported (our records are written straight from the "
                "staging buffers); drop _extensions. DataStatesReader does load checkpoints that "
                "FileSystemWriter wrote with them"
            )
        return value

    def apply(self, config: DataStatesConfig) -> DataStatesConfig:
        """``config`` with the arguments that map onto it; a conflict with a field ``config`` sets is refused."""
        updates: dict[str, Any] = {}
        for stock, ours in (("sync_files", "fsync"), ("thread_count", "io_threads")):
            value = getattr(self, stock)
            if value is None:
                continue
            if ours in config.model_fields_set and getattr(config, ours) != value:
                raise InvalidOptionError(
                    f"DataStatesWriter: {stock}={value!r} contradicts config.{ours}={getattr(config, ours)!r} "
                    f"({stock} is stock's name for {ours}); pass only one of them"
                )
            updates[ours] = value
        return config.model_copy(update=updates) if updates else config


def writer_options(**kwargs: Any) -> FileSystemWriterOptions:
    """Validate stock ``FileSystemWriter`` arguments; a wrong one raises ``InvalidOptionError`` naming it and the fix."""
    if "_extensions" in kwargs:
        kwargs["extensions"] = kwargs.pop("_extensions")
    try:
        return FileSystemWriterOptions(**kwargs)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'_extensions' if error['loc'] == ('extensions',) else '.'.join(map(str, error['loc']))}: "
            f"{error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise InvalidOptionError(f"DataStatesWriter: {problems}") from None
