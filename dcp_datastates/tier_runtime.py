"""Multi-level checkpoints, the tier worker: what happens to a save after its files are on the local disk.

One ``TierRuntime`` per process, created by the first multi-level save on the caller's
thread (``dist.new_group`` is a collective on the default group, so it is made in a call
every rank makes in the same order). It owns three gloo groups, each used by one thread:

* **control** -- the caller's thread: the node map, and the per-save "does it fit on
  every local disk" agreement;
* **tier** -- the tier worker thread, which handles saves in order (``seq``, the same on
  every rank): it receives the sealed ``.metadata`` from the coordinator's ``finish``
  (a broadcast; ``None`` means the save failed and every rank drops it), commits each
  other node's local copy (the coordinator's node committed in ``finish``), exchanges the
  partner copies (``partner``), agrees that they arrived and publishes their
  ``.metadata``, decides whether the checkpoint is drained (``drain_every``, and for
  ``skip`` whether any rank's drain is still busy), and prunes old local copies;
* **drain** -- the drain thread (``drain``).

Nothing here blocks the training loop: the caller's thread only posts work.
"""

from __future__ import annotations

import atexit
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dcp_datastates.config import DataStatesConfig
from dcp_datastates.drain import Drainer, DrainJob
from dcp_datastates.partner import exchange
from dcp_datastates.save_claim import DirectoryIdentity
from dcp_datastates.tier_comm import all_gather_object, all_reduce_int, broadcast_bytes, distributed, rank, world_size
from dcp_datastates.tier_files import Manifest, Pin, commit_copy, make_copy_dir, prune, remove_files
from dcp_datastates.tiers import PARTNER_DIR, TierConfigError, Topology, node_identity, partner_step_dir
from dcp_datastates.resume import step_of

logger = logging.getLogger("dcp_datastates")


@dataclass(frozen=True)
class RankFiles:
    """What one rank wrote for a save, reported to every rank in ``write_data``'s agreement."""

    rank: int
    error: str | None
    files: dict[str, int]  # name -> size (data files and the checksum side file)
    side_digests: dict[str, str]  # checksum side file -> SHA-256


@dataclass
class TierOutcome:
    """What became of one save's tiers on this rank (tests and benchmarks read it)."""

    seq: int
    name: str
    aborted: bool = False
    local_committed: bool = False
    partner_committed: bool = False
    partner_bytes_received: int = 0
    drain: "Future[str]" = field(default_factory=Future)  # "drained", "failed", "superseded", "skipped", "not due"
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class TierJob:
    seq: int
    name: str
    config: DataStatesConfig
    shared_dir: Path
    local_dir: Path
    local_identity: DirectoryIdentity | None
    save_tag: str
    overwrite: bool
    reports: list[RankFiles]
    outcome: TierOutcome


class TierRuntime:
    """The process's tier groups and threads (see the module docstring)."""

    _instance: "TierRuntime | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.rank = rank()
        multi = distributed() and world_size() > 1
        # Three groups, made in this order on every rank (a collective on the default group).
        self.control = dist.new_group(backend="gloo") if multi else None
        self.tier_group = dist.new_group(backend="gloo") if multi else None
        self.drain_group = dist.new_group(backend="gloo") if multi else None
        self.node = node_identity()
        self.topology = Topology(tuple(all_gather_object(self.node, self.control)))
        self._cv = threading.Condition()
        self._jobs: dict[int, TierJob] = {}
        self._metadata: dict[int, bytes | None] = {}
        self._next_seq = 0
        self._handled = 0  # seqs below this are done
        self._stopped = False
        self.outcomes: list[TierOutcome] = []
        self.policy: str | None = None
        self.drainer = Drainer(self.drain_group, self.rank)
        self._thread = threading.Thread(target=self._loop, name="dcp_datastates-tiers", daemon=True)
        self._thread.start()

    # -- the caller's thread ------------------------------------------------------------------
    @classmethod
    def get(cls) -> "TierRuntime":
        """The runtime, created now (a collective: call it where every rank does, on the caller's thread)."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
                atexit.register(cls._instance._at_exit)
            return cls._instance

    @classmethod
    def current(cls) -> "TierRuntime | None":
        return cls._instance

    def agree_min(self, value: int) -> int:
        """An agreement on the caller's thread (the control group)."""
        return all_reduce_int(value, "min", self.control)

    def check_config(self, config: DataStatesConfig) -> None:
        ml = config.multilevel
        assert ml is not None
        if not ml.has_node_field and len(self.topology.node_names()) > 1:
            raise TierConfigError(
                f"multilevel.local_dir {ml.local_dir!r} has no '{{node}}' but the job runs on "
                f"{len(self.topology.node_names())} nodes ({self.topology.node_names()[:4]}); put '{{node}}' in it "
                "(e.g. '/local_nvme/{node}/ckpt') so no two nodes can ever write one directory")
        if self.policy is None:
            self.policy = ml.drain_policy
        elif self.policy != ml.drain_policy:
            raise TierConfigError(
                f"multilevel.drain_policy changed from {self.policy!r} to {ml.drain_policy!r} within one job; "
                "every save of a process must use the same drain policy")

    def wait_for_drains(self) -> None:
        """``drain_policy='wait'``: until everything handed to the tier worker is handled and drained."""
        with self._cv:
            self._cv.wait_for(lambda: self._handled >= self._next_seq)
        self.drainer.wait_idle()

    # -- the upload thread ----------------------------------------------------------------------
    def next_seq(self) -> int:
        with self._cv:
            self._next_seq += 1
            return self._next_seq - 1

    def submit(self, job: TierJob) -> None:
        with self._cv:
            self.outcomes.append(job.outcome)
            self._jobs[job.seq] = job
            self._cv.notify_all()

    def post_metadata(self, seq: int, data: bytes | None) -> None:
        """The coordinator's ``finish``: the sealed ``.metadata`` of save ``seq``, or ``None`` if it failed."""
        with self._cv:
            self._metadata[seq] = data
            self._cv.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every save handed over so far has its tiers done (local, partner, drain); False on timeout."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._handled >= self._next_seq, timeout):
                return False
        return self.drainer.wait_idle(timeout)

    # -- the tier worker -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._handled in self._jobs or self._stopped)
                if self._handled not in self._jobs:
                    return
                job = self._jobs.pop(self._handled)
            try:
                self._handle(job)
            except BaseException:  # noqa: BLE001 - logged; the worker must go on with the next save
                logger.exception("dcp_datastates: tier work for %s failed on rank %d", job.name, self.rank)
                if not job.outcome.drain.done():
                    job.outcome.drain.set_result("failed")
            finally:
                job.outcome.done.set()
                with self._cv:
                    self._handled += 1
                    self._cv.notify_all()

    def _handle(self, job: TierJob) -> None:
        ml = job.config.multilevel
        assert ml is not None
        outcome, topo, fsync = job.outcome, self.topology, job.config.fsync
        if self.rank == 0:
            with self._cv:
                self._cv.wait_for(lambda: job.seq in self._metadata)
                data = self._metadata.pop(job.seq)
        else:
            data = None
        data = broadcast_bytes(data, 0, self.tier_group)
        mine = job.reports[self.rank].files
        if data is None:  # the save failed at its commit: drop its files everywhere
            outcome.aborted = True
            remove_files(job.local_dir, list(mine))
            outcome.drain.set_result("not due")
            return
        node = topo.nodes[self.rank]
        node_ranks = topo.ranks_on(node)
        leader = topo.leader(node) == self.rank
        local_ok = 1
        if leader and node != topo.nodes[0]:  # the coordinator's node was committed by finish
            try:
                commit_copy(job.local_dir, data, Manifest(job.name, job.save_tag, topo.world_size, "local", node, tuple(node_ranks)),
                            _required(job.reports, node_ranks), fsync=fsync, identity=job.local_identity)
            except BaseException as exc:  # noqa: BLE001
                local_ok = 0
                logger.warning("dcp_datastates: committing the local copy of %s on node %s failed (%s)", job.name, node, exc)
        partner_ok = 0
        problem = topo.partner_problem() if ml.partners else "partners=0"
        if problem is None:
            partner_ok = self._partner_copy(job, data)
        elif ml.partners:
            _warn_once(f"dcp_datastates: no partner copies: {problem}")
        # every rank learns whether every node committed its local copy, and every partner copy arrived
        outcome.local_committed = bool(all_reduce_int(local_ok, "min", self.tier_group))
        outcome.partner_committed = problem is None and bool(all_reduce_int(partner_ok, "min", self.tier_group))
        self._decide_drain(job, data)
        if leader and outcome.local_committed and (outcome.partner_committed or problem is not None):
            step = step_of(job.name)
            pruned = prune(ml.local_root(node), ml.keep_local, fsync=fsync, upto_step=step)
            pruned += prune(ml.local_root(node) / PARTNER_DIR, ml.keep_local, fsync=fsync, upto_step=step)
            if pruned:
                logger.info("dcp_datastates: node %s pruned local checkpoints %s (keep_local=%d)", node, pruned, ml.keep_local)

    def _partner_copy(self, job: TierJob, data: bytes) -> int:
        """Send this rank's files to its partner, receive its source's; commit the partner copy if all arrived."""
        topo, fsync = self.topology, job.config.fsync
        ml = job.config.multilevel
        assert ml is not None
        node = topo.nodes[self.rank]
        source_rank = topo.source_rank(self.rank)
        source_node = topo.nodes[source_rank]
        target = partner_step_dir(ml, node, job.name)
        error: BaseException | None = None
        try:
            make_copy_dir(target)
        except OSError as exc:
            error = exc
        outgoing = [(job.local_dir / name, size) for name, size in sorted(job.reports[self.rank].files.items())]
        incoming = [(target / name, size) for name, size in sorted(job.reports[source_rank].files.items())]
        received, failure = exchange(self.tier_group, topo.partner_rank(self.rank), outgoing, source_rank, incoming, fsync=fsync)
        job.outcome.partner_bytes_received = received
        error = error or failure
        ok = all_reduce_int(0 if error is not None else 1, "min", self.tier_group)
        if error is not None:
            logger.warning("dcp_datastates: partner copy of %s on rank %d failed (%s); the local copy stays", job.name, self.rank, error)
        if not ok:
            return 0
        committed = 1
        if topo.leader(node) == self.rank:
            source_ranks = topo.ranks_on(source_node)
            try:
                commit_copy(target, data, Manifest(job.name, job.save_tag, topo.world_size, "partner", source_node, tuple(source_ranks)),
                            _required(job.reports, source_ranks), fsync=fsync)
            except BaseException as exc:  # noqa: BLE001
                committed = 0
                logger.warning("dcp_datastates: committing the partner copy of %s on node %s failed (%s)", job.name, node, exc)
        return committed

    def _decide_drain(self, job: TierJob, data: bytes) -> None:
        """Whether this checkpoint goes to the shared path; the same answer on every rank."""
        ml = job.config.multilevel
        assert ml is not None
        outcome = job.outcome
        due = ml.drain_every > 0 and (job.seq + 1) % ml.drain_every == 0
        if not due or not outcome.local_committed:
            outcome.drain.set_result("not due" if not due else "failed")
            return
        if ml.drain_policy == "skip" and all_reduce_int(int(self.drainer.busy()), "max", self.tier_group):
            outcome.drain.set_result("skipped")
            logger.info("dcp_datastates: %s is not drained to the shared path: the previous drain still runs "
                        "(drain_policy='skip')", job.name)
            return
        drain = DrainJob(job.seq, job.name, ml.drain_policy, job.local_dir, job.shared_dir, sorted(job.reports[self.rank].files),
                         _required(job.reports, range(len(job.reports))), data, job.save_tag, job.overwrite, job.config.fsync,
                         _pin(job.local_dir))
        drain.result.add_done_callback(lambda f: outcome.drain.set_result(f.result()) if not outcome.drain.done() else None)
        self.drainer.submit(drain)

    def _at_exit(self) -> None:
        """A script that returns lets its tier work finish (local copies, partner copies, drains)."""
        if not self.flush(timeout=600):
            logger.warning("dcp_datastates: tier work still running at exit after 600 s; shared copies may be missing")
        self._stop()

    def _stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self.drainer.stop()


def _pin(directory: Path) -> Pin | None:
    """Pin a local copy for its drain; never raise: every rank must hand the drain over (the drains agree)."""
    try:
        return Pin(directory)
    except OSError as exc:
        logger.warning("dcp_datastates: cannot pin %s for its drain (%s); pruning may remove it first", directory, exc)
        return None


def _required(reports: list[RankFiles], ranks: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in ranks:
        out.update(reports[r].files)
    return out


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def flush_tiers(timeout: float | None = None) -> bool:
    """Wait until this process's multi-level work is done: local and partner copies committed, drains finished.

    Call it before ``dist.destroy_process_group()`` (the tier threads use their own groups).
    Returns False if ``timeout`` seconds passed first; True at once where no multi-level save ran.
    """
    runtime = TierRuntime.current()
    return True if runtime is None else runtime.flush(timeout)


def shutdown_tiers(timeout: float | None = None) -> bool:
    """Finish this process's multi-level work (``flush_tiers``) and stop its tier threads.

    The next multi-level save makes a new runtime -- and new groups, so like the first one
    every rank must reach it. Returns False (and stops nothing) if the work did not finish in time.
    """
    with TierRuntime._lock:
        runtime = TierRuntime._instance
        if runtime is None:
            return True
        if not runtime.flush(timeout):
            return False
        runtime._stop()
        runtime._thread.join(timeout)
        runtime.drainer.join(timeout)
        atexit.unregister(runtime._at_exit)
        TierRuntime._instance = None
        return True
