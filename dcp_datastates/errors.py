"""Errors a user of the backend can meet, each saying what is wrong and how to fix it."""

from __future__ import annotations


class DataStatesError(Exception):
    """Base class of every error raised by dcp_datastates."""


class CheckpointExistsError(DataStatesError, FileExistsError):
    """The target directory already holds a complete checkpoint and the writer was built with ``overwrite=False``.

    Its message starts with stock DCP's words, "Checkpoint already exists", so code that
    matches stock's error keeps working.
    """


class InvalidOptionError(DataStatesError, ValueError, TypeError):
    """A writer or reader argument has the wrong type or a value we cannot honour; the message names it and the fix."""


class CheckpointPathError(DataStatesError, OSError):
    """The checkpoint path cannot be used (it is a file, or cannot be written/read)."""


class IncompleteCheckpointError(DataStatesError, FileNotFoundError):
    """A directory without a committed ``.metadata``: a save failed, is still running, or it is the wrong path."""


class MissingKeysError(DataStatesError, KeyError):
    """The state dict asks for keys the checkpoint does not hold."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class CheckpointIOError(DataStatesError, OSError):
    """A read or write failed; the message names the file and offset."""


class ChecksumMismatchError(CheckpointIOError):
    """Bytes on disk differ from the checksums recorded at save time (bit rot, truncation, tampering)."""


class UnsafeCheckpointError(DataStatesError, ValueError):
    """Loading would unpickle something that could run code; needs an explicit opt-in."""


class CorruptCheckpointError(DataStatesError, ValueError):
    """A checkpoint file is malformed: ``.metadata``, a checksum file, or a record's place in a data file.

    The message names the file and what is wrong with it. Raised instead of whatever raw
    exception the malformed bytes would otherwise provoke, and never after running or
    allocating anything the file asked for.
    """


class UnverifiedCheckpointError(DataStatesError, ValueError):
    """The integrity policy demands a checkpoint verified end to end, and this one cannot be.

    Raised under ``integrity='required'`` or an integrity key for a checkpoint without a seal
    (stock DCP, or its seal removed), saved without checksums, or not sealed with the key.
    The message says which, and how to load it anyway if you trust it.
    """


class UnsupportedCheckpointError(DataStatesError, ValueError):
    """The checkpoint uses a feature this reader cannot decode (the message starts "unsupported: <what>")."""


class SaveAbandonedError(DataStatesError, RuntimeError):
    """An in-flight save was abandoned because the process is being interrupted (Ctrl-C)."""


class CheckpointDirectoryChangedError(CheckpointIOError):
    """The checkpoint directory, or a data file in it, was removed or replaced while a save ran.

    The save is not committed: publishing ``.metadata`` would point at missing or short files.
    """


class CheckpointBusyError(DataStatesError, BlockingIOError):
    """Another save (this process or another one) is writing into the same checkpoint directory."""
