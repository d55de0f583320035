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
from typing import ClassVar, Literal, TypeVar

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


Engine = TypeVar("Engine")


#: What ``auto`` has said so far in this process: its choice is logged once, not on every save and load.
_logged: set[str] = set()


def _log_once(key: str, level: int, message: str, *args: object) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message, *args)


def choose_engine(name: EngineName, make_uring: Callable[[], Engine], make_threads: Callable[[], Engine], doing: str) -> Engine:
    """The engine ``name`` asks for; ``auto`` falls back to threads, saying why once per process (writes and reads alike)."""
    if name == "threads":
        return make_threads()
    try:
        engine = make_uring()
    except EngineUnavailable as exc:
        if name == "io_uring":
            raise EngineUnavailable(
                f"io_engine='io_uring' was asked for but io_uring cannot be used here: {exc}. "
                "Use io_engine='auto' or 'threads'."
            ) from exc
        _log_once(f"fallback-{doing}", logging.WARNING,
                  "dcp_datastates: io_uring unavailable (%s); %s with the threads engine (said once per process)", exc, doing)
        return make_threads()
    _log_once(f"uring-{doing}", logging.INFO, "dcp_datastates: %s with the io_uring engine", doing)
    return engine


def create_engine(name: EngineName, *, io_threads: int, queue_depth: int) -> WriteEngine:
    """Build the write engine the config asks for (see ``choose_engine``)."""
    from dcp_datastates.native.pwrite_engine import ThreadPoolWriteEngine
    from dcp_datastates.native.uring_engine import IoUringWriteEngine

    return choose_engine(name, lambda: IoUringWriteEngine(queue_depth), lambda: ThreadPoolWriteEngine(io_threads), "writing")
