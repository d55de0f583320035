"""Worker threads for the thread-pool engines (pwrite and preadv): plain threads fed by a queue.

Not a ``concurrent.futures`` executor: an executor refuses new work once the interpreter
has begun to exit, and a save (or load) still in flight when a script returns must be
able to finish -- the interpreter waits for it.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Request = TypeVar("Request")

#: Signals our threads never take: the kernel hands a process-directed signal to any thread that
#: does not block it, and only the main thread runs Python's handlers -- a SIGINT landing on one of
#: our workers would leave the main thread asleep, the handler unrun and the save going on.
INTERRUPTS = frozenset({signal.SIGINT, signal.SIGTERM})


def start_without_interrupts(thread: threading.Thread) -> None:
    """Start ``thread`` with SIGINT and SIGTERM blocked in it (it inherits the mask of the moment).

    The caller's mask is restored right after; a signal arriving in between stays pending and
    is delivered then, not lost.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class WorkerThreads(Generic[Request]):
    """``threads`` workers running ``run(request)``; at most ``2 * threads`` requests wait for one."""

    def __init__(self, threads: int, run: Callable[[Request], None], thread_name: str) -> None:
        self._run = run
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(2 * threads)
        self._closed = False
        self._workers: list[threading.Thread] = []
        try:
            for i in range(threads):
                worker = threading.Thread(target=self._work, name=f"{thread_name}-{i}", daemon=True)
                start_without_interrupts(worker)
                self._workers.append(worker)
        except BaseException:
            self.close()
            raise

    def _work(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            try:
                self._run(request)  # reports its own outcome (the request's on_done)
            finally:
                self._slots.release()

    def submit(self, request: Request) -> None:
        """Queue ``request``; blocks while every worker is busy and the queue is full."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        self._slots.acquire()
        self._queue.put(request)  # cannot fail: a worker is behind every queued request

    def close(self) -> None:
        """Let the workers drain the queue, then stop them (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join()
