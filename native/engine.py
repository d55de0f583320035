"""The write-engine interface and the choice between engines.

An engine takes aligned buffers and file offsets and writes them asynchronously,
calling ``on_done`` from its own thread when each write is fully on disk (or failed).
Engines know nothing about tensors or checkpoints: that keeps them small, testable
byte for byte against each other, and replaceable.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

logger = logging.getLogger("dcp_datastates")

EngineName = Literal["auto", "io_uring", "threads"]


class EngineUnavailable(RuntimeError):
    """The engine cannot run on this machine (missing binding, io_uring disabled, seccomp)."""


@dataclass
class WriteRequest:
    """One write of ``len(buffer)`` bytes at ``offset`` into ``fd``.

    ``buffer`` must stay alive and unchanged until ``on_done`` is called; ``path`` is
    only used to name the file in errors.
    """

    fd: int
    path: str
    buffer: memoryview
    offset: int
    on_done: Callable[[BaseException | None], None]


#: errnos worth a retry: the write may succeed if submitted again.
TRANSIENT_ERRNOS: frozenset[int] = frozenset({4, 11})  # EINTR, EAGAIN
MAX_RETRIES = 3


class WriteEngine(ABC):
    """Asynchronous positional writes. Thread-safe ``submit``; ``close`` waits for nothing."""

    name: ClassVar[str]

    @abstractmethod
    def submit(self, request: WriteRequest) -> None:
        """Queue a write; may block while the engine's queue is full (bounded in-flight I/O)."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine's threads and kernel resources. Pending writes must be done."""


def create_engine(name: EngineName, *, io_threads: int, queue_depth: int) -> WriteEngine:
    """Build the engine the config asks for; ``auto`` falls back to threads, saying why."""
    from dcp_datastates.native.pwrite_engine import ThreadPoolWriteEngine

    if name == "threads":
        return ThreadPoolWriteEngine(io_threads)
    from dcp_datastates.native.uring_engine import IoUringWriteEngine

    try:
        engine: WriteEngine = IoUringWriteEngine(queue_depth)
    except EngineUnavailable as exc:
        if name == "io_uring":
            raise EngineUnavailable(
                f"io_engine='io_uring' was asked for but io_uring cannot be used here: {exc}. "
                "Use io_engine='auto' or 'threads'."
            ) from exc
        logger.warning("dcp_datastates: io_uring unavailable (%s); writing with the threads engine", exc)
        return ThreadPoolWriteEngine(io_threads)
    logger.info("dcp_datastates: writing with the io_uring engine (queue depth %d)", queue_depth)
    return engine
