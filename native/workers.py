"""Worker threads for the thread-pool engines (pwrite and preadv): plain threads fed by a queue.

Not a ``concurrent.futures`` executor: an executor refuses new work once the interpreter
has begun to exit, and a save (or load) still in flight when a script returns must be
able to finish -- the interpreter waits for it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Request = TypeVar("Request")


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
                worker.start()
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
