"""Errors a user of the backend can meet, each saying what is wrong and how to fix it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


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


# -- catching our errors by type through DCP ----------------------------------------------------
#
# ``dcp.save``/``dcp.load`` (and the future of ``dcp.async_save``) report a failure raised inside
# a storage writer or reader as torch's ``CheckpointException``: a ``BaseException`` (so
# ``except Exception`` misses it) holding each failed rank's exception. ``stage()`` errors of an
# ``async_save`` reach the caller unwrapped. ``unwrap`` / ``unwrap_errors`` give the same class
# either way. No torch import here: a ``CheckpointException`` exists only once torch is loaded.

_CHECKPOINT_API = "torch.distributed.checkpoint.api"


def _is_checkpoint_exception(exc: BaseException) -> bool:
    api = sys.modules.get(_CHECKPOINT_API)
    return api is not None and isinstance(exc, api.CheckpointException)


def _rank_failures(exc: BaseException) -> dict[int, BaseException]:
    """Rank -> the exception that rank raised, nested ``CheckpointException`` s flattened."""
    out: dict[int, BaseException] = {}
    for rank, failure in sorted(getattr(exc, "failures", {}).items()):
        inner = failure[0] if isinstance(failure, tuple) else failure
        if _is_checkpoint_exception(inner):
            for inner_rank, nested in _rank_failures(inner).items():
                out.setdefault(inner_rank, nested)
        else:
            out.setdefault(rank, inner)
    return out


def unwrap(exc: BaseException) -> BaseException:
    """The exception a program should see for ``exc``, a failure of a DCP save or load.

    For torch's ``CheckpointException`` whose failed ranks include a ``KeyboardInterrupt``
    (Ctrl-C during ``dcp.save``): that ``KeyboardInterrupt``. Else, where a rank failed with
    a :class:`DataStatesError`: the lowest such rank's error, the very object that rank
    raised (same class as ``async_save``/``stage()`` raise directly), carrying
    ``failed_rank`` (its rank) and ``rank_failures`` (every failed rank's exception, by rank).
    Anything else -- our own error raised directly, or a failure that is not ours -- is
    returned unchanged.
    """
    if not _is_checkpoint_exception(exc):
        return exc
    failures = _rank_failures(exc)
    interrupted = [e for e in failures.values() if isinstance(e, KeyboardInterrupt)]
    if interrupted:
        return interrupted[0]
    ours = [(rank, e) for rank, e in failures.items() if isinstance(e, DataStatesError)]
    if not ours:
        return exc
    rank, chosen = ours[0]
    chosen.failed_rank = rank  # type: ignore[attr-defined]
    chosen.rank_failures = failures  # type: ignore[attr-defined]
    if chosen.__traceback__ is None:  # raised on another rank: keep where it came from
        trace = getattr(exc, "failures", {}).get(rank)
        if isinstance(trace, tuple) and len(trace) == 2 and trace[1] is not None and hasattr(chosen, "add_note"):
            import traceback

            chosen.add_note(f"raised on rank {rank}:\n" + "".join(traceback.format_list(trace[1])).rstrip())
    return chosen


@contextlib.contextmanager
def unwrap_errors() -> Iterator[None]:
    """Re-raise a failure of the DCP call inside as our own typed error (see :func:`unwrap`).

    ::

        with unwrap_errors():
            dcp.save(state, storage_writer=DataStatesWriter(path))   # CheckpointPathError, not CheckpointException

    Works around ``dcp.save``, ``dcp.load``, ``dcp.async_save`` (its ``stage()`` errors) and
    ``response.upload_completion.result()`` / ``staging_completion.result()`` alike; the
    ``CheckpointException`` stays attached as ``__cause__``. Failures that are not ours
    pass through unchanged.
    """
    try:
        yield
    except BaseException as exc:
        chosen = unwrap(exc)
        if chosen is exc:
            raise
        raise chosen from exc
