"""Multi-level checkpoints, the drain: a committed local checkpoint becomes durable on the shared path.

One drain thread per rank, with its own gloo group. For each checkpoint handed to it, every
rank copies *its own* files from its node's local copy into the shared directory (each
through a temporary name, fsynced); the ranks then agree that every copy succeeded, and
only then does rank 0 publish ``.metadata`` -- the very bytes of the local copies -- with
``commit.py``'s protocol (files checked, temporary name, rename, directory fsync). An
interrupted drain therefore leaves files without ``.metadata`` on the shared path: not a
checkpoint to any reader, stock or ours.

Which checkpoint is drained next is agreed as well, so every rank drains the same one:
with ``queue_one`` the newest one any rank has been handed (older ones waiting are
dropped: "newer replaces older"); with ``skip`` and ``wait`` the oldest one (they never
drop one that was handed over; ``skip`` decides earlier, in the tier worker, not to hand
a checkpoint over while a drain runs).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcp_datastates.commit import commit_checkpoint, has_complete_checkpoint, prepare_directory
from dcp_datastates.errors import CheckpointExistsError
from dcp_datastates.save_claim import DirectoryIdentity, DirectoryLock
from dcp_datastates.tier_comm import all_reduce_int
from dcp_datastates.tier_files import Pin, copy_file, remove_files, remove_stale_temporaries

logger = logging.getLogger("dcp_datastates")


@dataclass
class DrainJob:
    seq: int
    name: str
    policy: str
    local_dir: Path
    shared_dir: Path
    own_files: list[str]  # this rank's files, copied by this rank
    required: dict[str, int]  # every file of the save and its size (rank 0 checks them before publishing)
    metadata_bytes: bytes
    save_tag: str
    overwrite: bool
    fsync: bool
    pin: Pin | None = None
    result: "Future[str]" = field(default_factory=Future)  # "drained", "failed", "superseded"


def copy_one(source: Path, target: Path, fsync: bool) -> int:
    """Copy one file to the shared path (its own function: the crash tests stop a drain right here)."""
    return copy_file(source, target, fsync=fsync)


class Drainer:
    """The drain thread of one rank."""

    def __init__(self, group: Any, rank: int) -> None:
        self.group = group
        self.rank = rank
        self._cv = threading.Condition()
        self._pending: dict[int, DrainJob] = {}
        self._running: DrainJob | None = None
        self._stopped = False
        self.bytes_copied = 0
        self._thread = threading.Thread(target=self._loop, name="dcp_datastates-drain", daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        with self._cv:
            return self._running is not None or bool(self._pending)

    def submit(self, job: DrainJob) -> None:
        with self._cv:
            self._pending[job.seq] = job
            self._cv.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self._running is None and not self._pending, timeout)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._stopped)
                if not self._pending:
                    return
                newest = max(self._pending)
                proposal = newest if self._pending[newest].policy == "queue_one" else -min(self._pending)
            agreed = all_reduce_int(proposal, "max", self.group)  # newest (queue_one), else oldest (as -seq)
            target = abs(agreed)
            with self._cv:
                self._cv.wait_for(lambda: target in self._pending)
                job = self._pending.pop(target)
                dropped = [self._pending.pop(seq) for seq in sorted(self._pending) if seq < target]
                self._running = job
            for old in dropped:
                _release(old, "superseded")
                logger.info("dcp_datastates: %s was not drained to the shared path: %s replaced it (drain_policy='queue_one')",
                            old.name, job.name)
            outcome = "failed"
            try:
                outcome = "drained" if self._drain(job) else "failed"
            except BaseException:  # noqa: BLE001 - logged; the thread must go on
                logger.exception("dcp_datastates: draining %s to %s failed", job.name, job.shared_dir)
            finally:
                _release(job, outcome)
                with self._cv:
                    self._running = None
                    self._cv.notify_all()

    def _drain(self, job: DrainJob) -> bool:
        error: BaseException | None = None
        lock: DirectoryLock | None = None
        copied: list[str] = []
        try:
            prepare_directory(job.shared_dir)
            identity = DirectoryIdentity.of(job.shared_dir)
            if self.rank == 0:
                lock = DirectoryLock(identity)
                lock.acquire()
                if has_complete_checkpoint(job.shared_dir) and not job.overwrite:
                    raise CheckpointExistsError(
                        f"Checkpoint already exists and overwrite=False: {str(job.shared_dir)!r} holds a complete "
                        f"checkpoint; the local checkpoint {job.name} was not drained over it (leave overwrite at its "
                        "default, True, to replace it)")
            for name in job.own_files:
                copied.append(name)
                self.bytes_copied += copy_one(job.local_dir / name, job.shared_dir / name, job.fsync)
        except BaseException as exc:  # noqa: BLE001 - every rank must reach the agreement below
            error = exc
        ok = all_reduce_int(0 if error is not None else 1, "min", self.group)
        published = 0
        try:
            if ok and self.rank == 0:
                try:
                    commit_checkpoint(identity, job.metadata_bytes, job.save_tag,
                                      fsync=job.fsync, required=job.required, keep=set(job.required))
                    published = 1
                    remove_stale_temporaries(job.shared_dir)  # of drains of this step that were killed
                except BaseException as exc:  # noqa: BLE001
                    error = exc
        finally:
            if lock is not None:
                lock.release()
        published = all_reduce_int(published, "max", self.group)
        if not published:
            remove_files(job.shared_dir, copied)
            if error is not None:
                logger.warning("dcp_datastates: draining %s to %s failed on rank %d (%s); the shared path has no new "
                               "checkpoint, the local copies stay", job.name, job.shared_dir, self.rank, error)
        return bool(published)


def _release(job: DrainJob, outcome: str) -> None:
    if job.pin is not None:
        job.pin.release()
        job.pin = None
    if not job.result.done():
        job.result.set_result(outcome)
