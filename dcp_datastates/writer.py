"""``DataStatesWriter``: DCP ``StorageWriter`` (and ``AsyncStager``) for the DataStates-LLM write path.

Data flow of one save, per rank: **plan** (State Providers lay out every item at a
fixed offset) -> **stage** (a ``Snapshot`` streams tensors through the reusable host
buffer pool, objects are pickled on the side) -> **write** (full buffers go to the
io_uring or pwrite engine as large aligned writes) -> **commit** (the coordinator
writes ``.metadata`` atomically, see ``commit.py``).

With ``dcp.async_save`` the stage starts in ``stage()``, before DCP even plans, so the
copies and the disk run while training continues; with ``dcp.save`` it runs inside
``write_data``. The files are stock DCP files: ``FileSystemReader`` can load them.

``stage()`` does on the caller's thread only what must be done there: capture the state
that training may change before the snapshot reads it (``capture``). The snapshot plans
on its own thread, streams what is certainly this rank's, and holds what the global plan
may give to another rank (``replicas``); ``prepare_local_plan`` reports both,
``prepare_global_plan`` (coordinator) makes owners agree with what was staged and gives
the save one tag, and ``write_data`` writes the held items this rank owns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import SerializationFormat, _StorageInfo
from torch.distributed.checkpoint.metadata import STATE_DICT_TYPE, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dcp_datastates.buffer_pool import HostBufferPool
from dcp_datastates.capture import CapturedState, capture_mutable, skeleton_of
from dcp_datastates.checksums import FileChecksums, checksum_file_name, encode_checksum_file
from dcp_datastates.commit import (
    commit_checkpoint,
    has_complete_checkpoint,
    prepare_directory,
    required_sizes,
)
from dcp_datastates.config import DataStatesConfig
from dcp_datastates.dcp_call import find_async_save_call
from dcp_datastates.dir_files import CheckpointDir
from dcp_datastates.directory import DirectoryCheckpointId
from dcp_datastates import tier_save
from dcp_datastates.gc_pause import gc_paused
from dcp_datastates.errors import CheckpointExistsError, CheckpointPathError, DataStatesError, InvalidOptionError
from dcp_datastates.held import held_file_contents
from dcp_datastates.integrity import IntegrityPolicy
from dcp_datastates.metadata_check import seal_metadata
from dcp_datastates.planner import DataStatesSavePlanner, plan_layout, plan_snapshot
from dcp_datastates.replicas import SaveGroup, StagedItems, assign_owners
from dcp_datastates.save_claim import DirectoryIdentity, DirectoryLock, SaveClaim
from dcp_datastates.shutdown import InFlightSave, begin_save
from dcp_datastates.stock_options import writer_options
from dcp_datastates.snapshot import RecordLocation, Snapshot, SnapshotPlan, SnapshotResult
from dcp_datastates.tiers import TierConfigError


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilePrefix:
    """Per-rank file-name prefix, unique to one save so overwrites never touch live files."""

    prefix: str


class DataStatesWriter(DirectoryCheckpointId, StorageWriter, AsyncStager):
    """Write DCP checkpoints through a pinned buffer pool and an io_uring/pwrite engine.

    Args:
        path: checkpoint directory (created if missing).
        config: :class:`DataStatesConfig`, or a mapping of its fields (``{"io_engine": "threads"}``)
            validated into one here; defaults if omitted.
        overwrite: replace a complete checkpoint already in ``path`` (the default, as for stock
            ``FileSystemWriter``). The old one stays intact and loadable until the new
            ``.metadata`` is published (``commit.py``). ``False`` refuses such a directory with
            :class:`CheckpointExistsError` ("Checkpoint already exists ...", stock's words).
        single_file_per_rank, sync_files, thread_count, per_thread_copy_ahead,
        cache_staged_state_dict, serialization_format, _extensions: stock ``FileSystemWriter``'s
            arguments, so that it can be swapped for this one; what each does here is in
            :class:`~dcp_datastates.stock_options.FileSystemWriterOptions` (``sync_files`` is
            ``config.fsync``, ``thread_count`` is ``config.io_threads``). A wrong one raises
            :class:`InvalidOptionError` naming it and the fix.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: DataStatesConfig | Mapping[str, Any] | None = None,
        *,
        overwrite: bool = True,
        single_file_per_rank: bool = True,
        sync_files: bool | None = None,
        thread_count: int | None = None,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
        _extensions: Sequence[Any] | None = None,
    ) -> None:
        super().__init__()
        # Validate the config now: a wrong one would otherwise show only in write_data, after DCP
        # planned and the checkpoint directory was created. pydantic's error names the field.
        if isinstance(config, Mapping):
            config = DataStatesConfig.model_validate(dict(config))
        elif config is not None and not isinstance(config, DataStatesConfig):
            raise InvalidOptionError(
                f"DataStatesWriter(path, config): config must be a DataStatesConfig or a mapping of its fields, "
                f"got {type(config).__name__} {config!r}; pass e.g. DataStatesConfig(io_engine='threads') or "
                f"{{'io_engine': 'threads'}} (the other arguments are keyword-only: DataStatesWriter(path, overwrite=False))"
            )
        if not isinstance(overwrite, bool):
            raise InvalidOptionError(f"DataStatesWriter: overwrite must be True or False, got {type(overwrite).__name__} {overwrite!r}")
        self.stock_options = writer_options(
            single_file_per_rank=single_file_per_rank, sync_files=sync_files, thread_count=thread_count,
            per_thread_copy_ahead=per_thread_copy_ahead, cache_staged_state_dict=cache_staged_state_dict,
            serialization_format=serialization_format, _extensions=_extensions,
        )
        config = self.stock_options.apply(config if config is not None else DataStatesConfig())
        self.path = Path(path)
        self.config = config
        self.overwrite = overwrite
        self.save_id = uuid.uuid4().hex
        self.rank = 0
        self.is_coordinator = True
        self.last_stats: SnapshotResult | None = None  # what the last save on this rank did
        self.last_capture: CapturedState | None = None  # what the last stage() copied before returning
        self._snapshot: Snapshot | None = None
        self._shipped_result: tuple[str, SnapshotResult] | None = None
        self._claim: SaveClaim | None = None  # the running save's hold on its directory (save_claim.py)
        self._tier: tier_save.TierSave | None = None  # the running multi-level save (config.multilevel; tier_save.py)
        self._interrupt: InFlightSave | None = None  # the running save, as signals and exit see it (shutdown.py)

    # -- StorageWriter: set-up and planning ------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """Point the writer at ``checkpoint_id`` (DCP calls this when a save names one).

        ``checkpoint_id`` wins over the writer's path, as for stock writers. An async save
        reads it at call time (``stage``), so its snapshot is already there; a snapshot
        staged elsewhere (``stage`` called other than by ``dcp.async_save``) is never moved
        across directories: the save is refused and the snapshot's files removed.
        """
        staged_in = self._staged_directory()
        if self._tier is not None:  # multi-level: stage() put the files in the local tier, for this checkpoint_id
            if self._tier.staged and staged_in is not None and self._tier.matches(checkpoint_id):
                return
            self.path, self._tier = self._tier.shared_path, None
        if checkpoint_id:
            target = Path(checkpoint_id)
            if staged_in is not None and os.path.abspath(target) != os.path.abspath(staged_in):
                self._discard_staged()
                raise CheckpointPathError(
                    f"checkpoint_id {str(target)!r} differs from {str(staged_in)!r}, where this writer's snapshot "
                    "was staged (stage() was not called by dcp.async_save with that checkpoint_id). Save with "
                    "checkpoint_id equal to the writer's path, or leave one of them out; the staged files were removed."
                )
            self.path = target
        if staged_in is None:
            self.save_id = uuid.uuid4().hex

    def _staged_directory(self) -> Path | None:
        if self._snapshot is not None:
            return self._snapshot.directory
        if self._shipped_result is not None:
            return Path(self._shipped_result[0])
        return None

    def _discard_staged(self) -> None:
        """Drop the staged snapshot: wait until it stops writing (it reads private copies or guarded state), remove its files."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is not None:
            snapshot.begin()
            wait([snapshot.done])
            snapshot.discard()
        if self._shipped_result is not None:
            directory, result = self._shipped_result
            self._shipped_result = None
            claim = self._claim
            try:
                identity = claim.identity if claim is not None and claim.identity.path == Path(directory) \
                    else DirectoryIdentity.of(Path(directory))
                with identity.open_dir() as files:
                    for name in result.files:
                        files.remove(name)
            except DataStatesError:
                pass  # the directory was removed or replaced: nothing of ours is left in it

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank") or 0
        if not kwargs.get("use_collectives", True):
            raise InvalidOptionError(
                "DataStatesWriter needs rank coordination (use_collectives=True) to commit one "
                ".metadata atomically; drop use_collectives=False."
            )

    def storage_meta(self) -> StorageMeta | None:
        path = self._tier.shared_path if self._tier is not None else self.path  # multi-level: the shared path names it
        return StorageMeta(checkpoint_id=str(path), save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Claim the directory for this save -- or, after ``stage()`` claimed it, check it is still there.

        Never creates the directory a second time: a directory removed after the snapshot
        started must fail the save, not be re-created to receive a lone ``.metadata``.
        """
        claim = self._claim
        if claim is not None and claim.from_stage and not claim.confirmed and claim.identity.path == self.path:
            claim.confirmed = True
            try:
                claim.identity.check()
                claim.take_lock_again()  # only where the claim was shipped to this process
            except BaseException:
                self._end_save()
                raise
        else:
            if self.config.multilevel is not None:  # dcp.save: we are on the caller's thread
                self._tier = tier_save.begin(self, tier_save.plan_bytes(plan), None, staged=False)
            self._begin_save(self.is_coordinator, from_stage=False)
        return dataclasses.replace(plan, storage_data=self._staged_items())  # what this rank staged (replicas)

    def _begin_save(self, is_coordinator: bool, *, from_stage: bool = True, rank: int | None = None) -> None:
        """Start a save: create the directory once, record which one it is, lock it (coordinator).

        ``stage()`` calls this first thing, so a bad, occupied or busy path fails in the
        caller before any byte is copied. Every save gets a new ``save_id`` (the tag in its
        file names) here: DCP resets a writer only when a save names a ``checkpoint_id``, and a
        writer reused for its own path must not write over the files of the checkpoint it replaces.
        The save is registered with ``shutdown`` from now on: Ctrl-C, SIGTERM or
        ``abandon_in_flight_saves()`` abandon it.
        """
        self._end_save()  # a claim left by a save that failed before finish()
        self.save_id = uuid.uuid4().hex
        prepare_directory(self.path)
        identity = DirectoryIdentity.of(self.path)
        lock = DirectoryLock(identity) if is_coordinator else None
        if lock is not None:
            lock.acquire()
        claim = self._claim = SaveClaim(identity, lock, from_stage=from_stage, confirmed=not from_stage)
        # The lock dies with the process; this drops it sooner if the writer is dropped mid-save.
        claim.finalizer = weakref.finalize(self, claim.release)
        interrupt = self._interrupt = begin_save(
            self.path, self.save_id[:8], self.rank if rank is None else rank,
            coordinator=is_coordinator, background=False,  # stage() hands it to the snapshot when it returns
        )
        interrupt.release = claim.release
        if has_complete_checkpoint(self.path) and not self.overwrite:
            self._end_save()
            raise CheckpointExistsError(
                f"Checkpoint already exists and overwrite=False: {str(self.path)!r} holds a complete checkpoint "
                "(.metadata present). Save to a new directory, or leave overwrite at its default (True) to replace "
                "it: the old checkpoint stays intact and loadable until the new one is committed."
            )

    def _release_claim_on_failure(self, snapshot: Snapshot) -> None:
        """Free the directory if the staged snapshot fails: DCP then calls neither write_data nor finish.

        Watches ``staged`` too: its failure is what DCP's save thread reports first, and the
        snapshot has removed its files by then.
        """
        claim, interrupt = self._claim, self._interrupt

        def on_done(future: ThreadFuture[Any]) -> None:
            if future.exception() is not None:
                if claim is not None:
                    claim.release()
                if interrupt is not None:
                    interrupt.end()

        snapshot.staged.add_done_callback(on_done)
        snapshot.done.add_done_callback(on_done)

    def _claim_identity(self) -> DirectoryIdentity:
        """The directory this save claimed (``save_claim``); every file it creates goes through it."""
        claim = self._claim
        if claim is not None and claim.identity.path == self.path:
            return claim.identity
        return DirectoryIdentity.of(self.path)

    def _end_save(self) -> None:
        """Release this writer's claim (idempotent): after the commit, or once the save has failed."""
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.release()
        interrupt, self._interrupt = self._interrupt, None
        if interrupt is not None:
            interrupt.end()

    def _staged_items(self) -> StagedItems | None:
        """What this rank's snapshot wrote and holds, for the coordinator (``None``: nothing staged)."""
        if self._snapshot is not None:
            written, held = self._snapshot.planned.result()
            return StagedItems(written, held)
        if self._shipped_result is not None:
            result = self._shipped_result[1]
            return StagedItems(frozenset(result.records), frozenset(result.held))
        return None

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Owners that agree with what each rank staged, and one tag for every file of the save.

        DCP's dedup may give a replicated item to a rank that did not stage it (it skipped a
        DTensor replica another rank writes) or take it from the rank that already wrote it;
        ``assign_owners`` moves each such item to a rank that has it. The metadata DCP built
        is unaffected (it lists chunks, not owners); owners reach ``.metadata`` through each
        rank's write results, so they agree with these plans.
        """
        tag = self.save_id[:8]
        reports = [plan.storage_data if isinstance(plan.storage_data, StagedItems) else None for plan in plans]
        with gc_paused():
            items = assign_owners(plans, reports) if any(r is not None for r in reports) else [p.items for p in plans]
        return [
            dataclasses.replace(plan, items=owned, storage_data=FilePrefix(f"__{rank}_{tag}_"))
            for rank, (plan, owned) in enumerate(zip(plans, items))
        ]

    # -- AsyncStager: the lazy snapshot ----------------------------------------------------------
    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def synchronize_staging(self) -> None:
        self.wait_staged()

    def stage(self, state_dict: STATE_DICT_TYPE) -> ThreadFuture[STATE_DICT_TYPE]:
        """Start this rank's snapshot now and return at once (``dcp.async_save`` calls this).

        On this (the caller's) thread: tensors no known optimizer owns and mutable objects
        are captured (``capture``); nothing is planned. On the snapshot thread: DCP's local
        plan, the layout, then the copies (device tensors on a side CUDA stream) streaming
        through the shared buffer pool to disk. The returned future --
        ``AsyncSaveResponse.staging_completion`` -- resolves once nothing more is read from
        the live state; until then every ``torch.optim`` step waits for it (``capture``).
        In-place writes outside an optimizer step must ``wait_staged()`` first (README).
        """
        if self._snapshot is not None:
            raise RuntimeError(
                "this DataStatesWriter is still in use by an async save that has not reached write_data; "
                "create one DataStatesWriter per checkpoint (cheap: the buffer pool is shared) or wait for "
                "the previous save's upload_completion before reusing it"
            )
        call = find_async_save_call(self)
        if self._tier is not None:  # a previous multi-level save of this writer moved its path to the local tier
            self.path, self._tier = self._tier.shared_path, None
        if call is not None and call.checkpoint_id:
            self.path = Path(call.checkpoint_id)  # checkpoint_id wins, decided now: the files are written there
        group = _save_group(call)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if self.config.multilevel is not None:  # decides where the files go: this node's local tier, or the shared path
            self._tier = tier_save.begin(self, tier_save.state_bytes(state_dict), call.process_group if call else None, staged=True)
        self._begin_save(rank == 0, rank=rank)  # fail now, in the caller, on a bad, occupied or busy path
        try:
            staged = self._stage(state_dict, rank, group)
        except BaseException as exc:  # Ctrl-C inside the synchronous staging wait included
            self._abandon_staging(exc)
            raise
        if self._interrupt is not None:
            self._interrupt.driver = None  # the rest runs on the snapshot and DCP's upload threads
        return staged

    def _stage(self, state_dict: STATE_DICT_TYPE, rank: int, group: SaveGroup) -> ThreadFuture[STATE_DICT_TYPE]:
        budget = _capture_budget(self.config)
        captured = capture_mutable(state_dict, budget_bytes=budget)
        self.last_capture = dataclasses.replace(captured, state_dict={}, private_ids=set())  # what was copied, for logs/tests
        prefix = f"__{rank}_{self.save_id[:8]}_"

        def plan() -> SnapshotPlan:  # on the snapshot thread; reused while the state's structure is unchanged
            planner = DataStatesSavePlanner()
            with gc_paused():
                planner.set_up_planner(captured.state_dict, storage_meta=None, is_coordinator=rank == 0)
                planned = plan_snapshot(planner, group, prefix)
            return SnapshotPlan(planned.layout, planner.resolve_data, planned.held, captured.private_ids)

        snapshot = Snapshot(self.path, None, None, self.config, self._pool, plan=plan, identity=self._claim_identity(),
                            interrupt=self._interrupt)
        self._snapshot = snapshot
        snapshot.start(begin_within=0.0 if captured.over_budget else _BEGIN_WITHIN_S)
        self._release_claim_on_failure(snapshot)
        staged: ThreadFuture[STATE_DICT_TYPE] = _StagingFuture(snapshot)
        if captured.over_budget:
            # More unguarded state than we may copy aside: stage synchronously (exact, pool-bounded).
            _log_synchronous_once(captured.bytes_captured, budget)
            wait([snapshot.staged])

        def on_staged(f: ThreadFuture[None]) -> None:
            if f.exception() is not None:
                staged.set_exception(f.exception())
            else:
                # Shapes and placements only (meta tensors): DCP plans on it, nothing reads its data, and a
                # PROCESS executor pickles no (CUDA) tensor memory. Built here, off the copies' path (the
                # step guard waits on the snapshot itself, not on this future).
                try:
                    skeleton = skeleton_of(captured.state_dict)
                except Exception:  # noqa: BLE001 - the live dict serves DCP's planning as well, only heavier
                    logger.exception("dcp_datastates: could not build the staging skeleton; handing DCP the state dict")
                    skeleton = state_dict
                staged.set_result(skeleton)

        snapshot.staged.add_done_callback(on_staged)
        return staged

    def _abandon_staging(self, exc: BaseException) -> None:
        """``stage()`` is failing (Ctrl-C in its wait, or an error): stop our snapshot, remove its files, free the directory.

        Done before the exception leaves ``stage()``: nothing else would wait for the
        snapshot's (daemon) thread, and an interpreter exiting on the exception would kill
        it halfway, leaving a partial data file.
        """
        interrupt, snapshot = self._interrupt, self._snapshot
        if interrupt is not None and interrupt.cancel(f"stage() ended by {type(exc).__name__}"):
            logger.warning("dcp_datastates: abandoning in-flight checkpoint saves (stage() ended by %s): %s",
                           type(exc).__name__, self.path)
        self._snapshot = None
        if snapshot is not None:
            snapshot.begin()
            if wait([snapshot.done], timeout=_STOP_WITHIN_S).not_done:
                logger.warning("dcp_datastates: the abandoned snapshot into %s did not stop within %.0f s; "
                               "its partial files are removed but may be re-created", self.path, _STOP_WITHIN_S)
            snapshot.discard()
        if interrupt is not None:
            interrupt.remove_files()
        self._end_save()

    def wait_staged(self) -> None:
        """Block until the pending snapshot no longer reads the live state (a no-op if none is)."""
        snapshot = self._snapshot
        if snapshot is not None:
            snapshot.begin()
            snapshot.staged.result()

    def __getstate__(self) -> dict[str, Any]:
        # AsyncCheckpointerType.PROCESS ships the writer to a daemon process: hand over the
        # finished snapshot's record locations (plain data), never threads or buffers.
        if self._tier is not None:
            raise TierConfigError(
                "multi-level checkpoints run their tier work in this process; use dcp.async_save with the default "
                "AsyncCheckpointerType.THREAD (not PROCESS), or dcp.save")
        state = dict(self.__dict__)
        snapshot = state.pop("_snapshot", None)
        state["_shipped_result"] = None
        state["_interrupt"] = None  # locks and threads stay here; the daemon commits without them
        if snapshot is not None:
            snapshot.begin()
            state["_shipped_result"] = (str(snapshot.directory), snapshot.done.result())
            if self._interrupt is not None:  # this process's part is done: the files are the daemon's now
                self._interrupt.handed_over = True
                self._interrupt.end()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._snapshot = None

    # -- StorageWriter: the write step -------------------------------------------------------
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        if self._tier is not None and self._tier.local:  # multi-level: write, agree, hand to the tier worker
            return tier_save.write_data(self._tier, self, plan, planner)
        return self._write_files(plan, planner)

    def _write_files(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix: FilePrefix = plan.storage_data
        try:
            directory, result = self._finished_snapshot(plan, planner)
        except BaseException:
            self._end_save()  # finish() will not run: let the next save into this directory in
            raise
        assert os.path.abspath(directory) == os.path.abspath(self.path), (directory, self.path)  # see reset()
        created: list[str] = []  # ours under their final names: removed if the save fails here
        interrupt = self._interrupt
        try:
            if interrupt is not None:
                interrupt.add_tag(_tag_of(prefix.prefix))  # the save's files are renamed to the global tag
                interrupt.check()
            with self._claim_identity().open_dir() as files, gc_paused():
                try:
                    records = self._final_files(files, plan, result, prefix.prefix, created)
                    if interrupt is not None and not self.is_coordinator:
                        interrupt.hand_over()  # abandoned before this point: fail here, so the coordinator cannot commit
                except BaseException:
                    for name in created:
                        files.remove(name)
                    raise
        except BaseException:
            self._end_save()
            raise
        if not self.is_coordinator:
            self._end_save()  # this rank's part is done; the coordinator's finish() commits
        result.held = {}  # the copies are written or not ours: release their memory now
        self.last_stats = result
        with gc_paused():
            results = [_write_result(item, records[item.index]) for item in plan.items]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _final_files(
        self, files: CheckpointDir, plan: SavePlan, result: SnapshotResult, prefix: str, created: list[str]
    ) -> dict:
        """The snapshot's files under the save's prefix, the held items this rank owns, the side file.

        Every file is created through the claimed directory's descriptor, never reusing a name
        (``dir_files``); ``created`` collects the final names. Returns where each record is.
        """
        records, checksums = _rename_to_prefix(files, result, prefix, created)
        held = [item for item in plan.items if item.index not in records]
        missing = [item.index.fqn for item in held if item.index not in result.held]
        if missing:
            raise RuntimeError(
                f"items {missing[:5]} were planned but not staged; the state dict changed between "
                "async_save's staging and its save"
            )
        if held:  # replicated items the global plan gave to this rank: one file, written once
            name = f"{prefix}2.distcp"
            contents, where, sums = held_file_contents([result.held[i.index] for i in held], self.config.checksum_block_bytes)
            fd = files.create(name)
            created.append(name)
            files.write_into(fd, name, contents, self.config.fsync)
            records.update({index: RecordLocation(name, w.offset, w.length) for index, w in where.items()})
            checksums[name] = sums
        if self.config.checksums and checksums:
            name = checksum_file_name(prefix)
            fd = files.create(name)
            created.append(name)
            files.write_into(fd, name, encode_checksum_file(checksums), self.config.fsync)
        return records

    def _finished_snapshot(self, plan: SavePlan, planner: SavePlanner) -> tuple[Path, SnapshotResult]:
        """The snapshot ``stage`` started, or -- for ``dcp.save`` -- one run right here."""
        if self._snapshot is not None:
            snapshot, self._snapshot = self._snapshot, None
            return snapshot.directory, snapshot.done.result()
        if self._shipped_result is not None:
            directory, shipped = self._shipped_result
            self._shipped_result = None
            return Path(directory), shipped
        prefix: FilePrefix = plan.storage_data
        with gc_paused():  # dcp.save: the caller waits for all of it anyway
            layout = plan_layout(planner, plan.items, prefix.prefix)
            snapshot = Snapshot(self.path, layout, planner.resolve_data, self.config, self._pool,
                                identity=self._claim_identity(), interrupt=self._interrupt)
            snapshot.run()
        return self.path, snapshot.done.result()

    def _pool(self, state_bytes: int | None = None) -> HostBufferPool:
        """The process-wide staging pool for a save of ``state_bytes`` tensor-file bytes (None: unknown).

        With ``host_pool_bytes="auto"`` the first call sizes the pool to ``state_bytes`` (capped by
        a share of host memory) and later ones grow it if the state grew; an explicit size is used
        as given. Either way the pool fills on its own background thread, so this returns at once:
        call it from the thread that will copy (its current CUDA device registers the buffers).
        """
        pin = torch.cuda.is_available()
        if self.config.host_pool_bytes == "auto":
            return HostBufferPool.auto(self.config.chunk_bytes, pin, state_bytes)
        assert self.config.pool_buffers is not None
        return HostBufferPool.shared(self.config.chunk_bytes, self.config.pool_buffers, pin, state_bytes)

    # -- StorageWriter: the commit step ------------------------------------------------------
    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit (coordinator only): check the files, then publish ``.metadata`` atomically (``commit.py``)."""
        if self._tier is not None and self._tier.local:  # multi-level: seal, commit locally, hand to the tier worker
            return tier_save.finish(self._tier, self, metadata, results)
        with gc_paused():
            self._commit(metadata, results)

    def _commit(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """``finish`` proper: seal and publish; on failure remove every rank's files of this save."""
        try:
            storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
            metadata.storage_data = storage_data
            metadata.storage_meta = self.storage_meta()
            metadata.version = "1.0.0"
            referenced = {info.relative_path for info in storage_data.values()}
            checksum_files = {checksum_file_name(_prefix_of(name)) for name in referenced}
            required = required_sizes((i.relative_path, i.offset, i.length) for i in storage_data.values())
            sealed = checksum_files if self.config.checksums else set()
            required |= {name: 1 for name in sealed}  # every rank that wrote data wrote its checksums beside it
            key = IntegrityPolicy.of(self.config).key

            def seal(dir_fd: int) -> None:
                # Fail closed: seal .metadata's digest, each side file's SHA-256 and the seal's own facts
                # into it (keyed with an integrity key), reading the side files through the claimed directory.
                seal_metadata(metadata, self.path, sealed, checksums=self.config.checksums, key=key, dir_fd=dir_fd)

            interrupt = self._interrupt
            commit_checkpoint(
                self._claim_identity(),
                metadata,
                self.save_id[:8],
                fsync=self.config.fsync,
                required=required,
                keep=referenced | checksum_files,
                seal=seal,
                commit_point=interrupt.commit_point if interrupt is not None else None,
            )
        except BaseException:
            # Not published (else commit_checkpoint has returned, or failed only after the rename): no
            # rank's file of this save can ever be loaded; remove them all (Ctrl-C, SIGTERM, refused commit).
            interrupt = self._interrupt
            if interrupt is not None and not interrupt.committing:
                interrupt.remove_files(all_ranks=True)
            raise
        finally:
            self._end_save()


#: Unguarded state ``stage()`` may copy aside: the host pool's size, and at least this much
#: (BatchNorm statistics, amax history and small EMAs of a typical model fit). Beyond it the
#: save stages synchronously through the pool: exact, bounded memory, not lazy.
CAPTURE_BUDGET_FLOOR = 512 * 1024**2

#: Longest an interrupted ``stage()`` waits for its snapshot to stop (in-flight writes to finish).
_STOP_WITHIN_S = 30.0

#: Longest a staged snapshot waits for async_save to return before it starts planning anyway.
_BEGIN_WITHIN_S = 0.05


class _StagingFuture(ThreadFuture):
    """The future ``stage`` returns: tells the snapshot when ``dcp.async_save`` is about to return.

    ``async_save``'s last act is to register a callback on this future; the snapshot's
    planning (GIL-bound Python) starts then, not while the caller is still inside the
    call (DCP's upload thread waits on ``result`` earlier, so that does not count). It
    never waits for more than ``_BEGIN_WITHIN_S``.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self._snapshot = snapshot

    def add_done_callback(self, fn: Any) -> None:
        super().add_done_callback(fn)
        self._snapshot.begin()


_logged_synchronous = False


def _capture_budget(config: DataStatesConfig) -> int:
    """Bytes ``stage()`` may copy aside: an explicit pool size, and at least ``CAPTURE_BUDGET_FLOOR``."""
    pool_bytes = config.host_pool_bytes if isinstance(config.host_pool_bytes, int) else 0  # "auto": sized later
    return max(pool_bytes, CAPTURE_BUDGET_FLOOR)


def _log_synchronous_once(unguarded: int, budget: int) -> None:
    global _logged_synchronous
    if not _logged_synchronous:
        _logged_synchronous = True
        logger.warning(
            "dcp_datastates: %d MiB of the state dict is not owned by any optimizer known to have stepped, more than "
            "the %d MiB a save may copy aside (host_pool_bytes, at least 512 MiB); async_save staged synchronously (it returned once the "
            "snapshot stopped reading live state). Saves after the first optimizer.step() -- or after "
            "install_optimizer_guard(optimizer) -- read parameters and optimizer state lazily.",
            unguarded >> 20, budget >> 20,
        )


def _save_group(call: Any) -> SaveGroup:
    """Who saves together, from the ``dcp.async_save`` call (``None``: not called by it -- assume nothing)."""
    if not (dist.is_available() and dist.is_initialized()) or (call is not None and call.no_dist):
        return SaveGroup(single=True)
    if call is None:
        return SaveGroup(single=dist.get_world_size() == 1, ranks=None)
    group = call.process_group or dist.group.WORLD
    ranks = frozenset(dist.get_process_group_ranks(group))
    return SaveGroup(single=len(ranks) == 1, ranks=ranks)


def _rename_to_prefix(
    files: CheckpointDir, result: SnapshotResult, prefix: str, renamed: list[str]
) -> tuple[dict, dict[str, FileChecksums]]:
    """Give a staged snapshot's files the save's one prefix (same directory: an atomic rename).

    A snapshot staged by ``async_save`` names its files before the global plan exists;
    the coordinator's tag reaches every rank only in the global plan. A rename never
    replaces an entry at the new name (``CheckpointDir.rename_new``); ``renamed`` collects
    the final names, and on failure the files not yet renamed are removed too.
    """
    names: dict[str, str] = {}
    try:
        for name in result.files:
            new = prefix + name[len(_prefix_of(name)) :]
            files.rename_new(name, new)
            renamed.append(new)
            names[name] = new
    except BaseException:
        for name in result.files:
            if name not in names:
                files.remove(name)
        raise
    records = {
        index: RecordLocation(names.get(where.relative_path, where.relative_path), where.offset, where.length)
        for index, where in result.records.items()
    }
    checksums = {names.get(name, name): sums for name, sums in result.checksums.items()}
    return records, checksums


def _write_result(item: WriteItem, where: RecordLocation) -> WriteResult:
    return WriteResult(
        index=item.index, size_in_bytes=where.length, storage_data=_StorageInfo(where.relative_path, where.offset, where.length)
    )


def _tag_of(prefix: str) -> str:
    """``__0_ab12cd34_`` -> ``ab12cd34`` (the save's tag)."""
    return prefix.rstrip("_").rsplit("_", 1)[-1]


def _prefix_of(file_name: str) -> str:
    """``__0_ab12cd34_0.distcp`` -> ``__0_ab12cd34_`` (the save's per-rank file prefix)."""
    return file_name[: file_name.rindex("_") + 1]
