"""``DataStatesWriter``: DCP ``StorageWriter`` (and ``AsyncStager``) for the DataStates-LLM write path.

Data flow of one save, per rank: **plan** (State Providers lay out every item at a
fixed offset) -> **stage** (a ``Snapshot`` streams tensors through the reusable host
buffer pool, objects are pickled on the side) -> **write** (full buffers go to the
io_uring or pwrite engine as large aligned writes) -> **commit** (the coordinator
writes ``.metadata`` atomically, see ``commit.py``).

With ``dcp.async_save`` the stage starts in ``stage()``, before DCP even plans, so the
copies and the disk run while training continues; with ``dcp.save`` it runs inside
``write_data``. The files are stock DCP files: ``FileSystemReader`` can load them.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Mapping
import weakref
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import STATE_DICT_TYPE, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dcp_datastates.buffer_pool import HostBufferPool
from dcp_datastates.checksums import checksum_file_name
from dcp_datastates.commit import (
    commit_checkpoint,
    has_complete_checkpoint,
    prepare_directory,
    required_sizes,
)
from dcp_datastates.config import DataStatesConfig
from dcp_datastates.directory import DirectoryCheckpointId
from dcp_datastates.errors import CheckpointExistsError
from dcp_datastates.metadata_check import expected_checksum_files, seal_metadata
from dcp_datastates.planner import DataStatesSavePlanner, plan_layout
from dcp_datastates.save_claim import DirectoryIdentity, DirectoryLock, SaveClaim
from dcp_datastates.snapshot import RecordLocation, Snapshot, SnapshotResult


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
        overwrite: replace a complete checkpoint already in ``path``. The old one stays
            intact and loadable until the new one commits.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: DataStatesConfig | Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        # Validate the config now: a wrong one would otherwise show only in write_data, after DCP
        # planned and the checkpoint directory was created. pydantic's error names the field.
        if isinstance(config, Mapping):
            config = DataStatesConfig.model_validate(dict(config))
        elif config is not None and not isinstance(config, DataStatesConfig):
            raise TypeError(
                f"DataStatesWriter(path, config): config must be a DataStatesConfig or a mapping of its fields, "
                f"got {type(config).__name__} {config!r}; pass e.g. DataStatesConfig(io_engine='threads') or "
                f"{{'io_engine': 'threads'}} (overwrite is keyword-only: DataStatesWriter(path, overwrite=True))"
            )
        self.path = Path(path)
        self.config = config if config is not None else DataStatesConfig()
        self.overwrite = overwrite
        self.save_id = uuid.uuid4().hex
        self.rank = 0
        self.is_coordinator = True
        self.last_stats: SnapshotResult | None = None  # what the last save on this rank did
        self._snapshot: Snapshot | None = None
        self._shipped_result: tuple[str, SnapshotResult] | None = None
        self._claim: SaveClaim | None = None  # the running save's hold on its directory (save_claim.py)

    # -- StorageWriter: set-up and planning ------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank") or 0
        if not kwargs.get("use_collectives", True):
            raise ValueError(
                "DataStatesWriter needs rank coordination (use_collectives=True) to commit one "
                ".metadata atomically; drop use_collectives=False."
            )

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path), save_id=self.save_id)

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
            self._begin_save(self.is_coordinator, from_stage=False)
        return plan

    def _begin_save(self, is_coordinator: bool, *, from_stage: bool = True) -> None:
        """Start a save: create the directory once, record which one it is, lock it (coordinator).

        ``stage()`` calls this first thing, so a bad, occupied or busy path fails in the
        caller before any byte is copied.
        """
        self._end_save()  # a claim left by a save that failed before finish()
        prepare_directory(self.path)
        identity = DirectoryIdentity.of(self.path)
        lock = DirectoryLock(self.path, self.save_id[:8]) if is_coordinator else None
        if lock is not None:
            lock.acquire()
        claim = self._claim = SaveClaim(identity, lock, from_stage=from_stage, confirmed=not from_stage)
        # The lock dies with the process; this drops it sooner if the writer is dropped mid-save.
        claim.finalizer = weakref.finalize(self, claim.release)
        if has_complete_checkpoint(self.path) and not self.overwrite:
            self._end_save()
            raise CheckpointExistsError(
                f"{str(self.path)!r} already holds a complete checkpoint (.metadata present). "
                "Save to a new directory, or pass DataStatesWriter(path, overwrite=True) to replace it "
                "(the old checkpoint stays intact until the new one is committed)."
            )

    def _release_claim_on_failure(self, snapshot: Snapshot) -> None:
        """Free the directory if the staged snapshot fails: DCP then calls neither write_data nor finish.

        Watches ``staged`` too: its failure is what DCP's save thread reports first, and the
        snapshot has removed its files by then.
        """
        claim = self._claim

        def on_done(future: ThreadFuture[Any]) -> None:
            if future.exception() is not None and claim is not None:
                claim.release()

        snapshot.staged.add_done_callback(on_done)
        snapshot.done.add_done_callback(on_done)

    def _end_save(self) -> None:
        """Release this writer's claim (idempotent): after the commit, or once the save has failed."""
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.release()

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        tag = self.save_id[:8]
        return [dataclasses.replace(plan, storage_data=FilePrefix(f"__{rank}_{tag}_")) for rank, plan in enumerate(plans)]

    # -- AsyncStager: the lazy snapshot ----------------------------------------------------------
    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def synchronize_staging(self) -> None:
        self.wait_staged()

    def stage(self, state_dict: STATE_DICT_TYPE) -> ThreadFuture[STATE_DICT_TYPE]:
        """Start this rank's snapshot now and return at once (``dcp.async_save`` calls this).

        Copies begin immediately on a background thread (device tensors on a side CUDA
        stream), streaming through the shared buffer pool to disk. The returned future --
        ``AsyncSaveResponse.staging_completion`` -- resolves once every byte has been
        copied out of the live state; until then the training loop must not mutate it
        (``wait_staged`` / ``install_optimizer_guard`` block right before the optimizer step).
        """
        if self._snapshot is not None:
            raise RuntimeError(
                "this DataStatesWriter is still in use by an async save that has not reached write_data; "
                "create one DataStatesWriter per checkpoint (cheap: the buffer pool is shared) or wait for "
                "the previous save's upload_completion before reusing it"
            )
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._begin_save(rank == 0)  # fail now, in the caller, on a bad, occupied or busy path
        planner = DataStatesSavePlanner()
        planner.set_up_planner(state_dict, storage_meta=None, is_coordinator=rank == 0)
        items = planner.create_local_plan().items
        layout = planner.plan_layout(items, f"__{rank}_{self.save_id[:8]}_")
        snapshot = Snapshot(self.path, layout, planner.resolve_data, self.config, self._pool()).start()
        self._snapshot = snapshot
        self._release_claim_on_failure(snapshot)
        staged: ThreadFuture[STATE_DICT_TYPE] = ThreadFuture()

        def on_staged(f: ThreadFuture[None]) -> None:
            if f.exception() is not None:
                staged.set_exception(f.exception())
            else:
                staged.set_result(state_dict)

        snapshot.staged.add_done_callback(on_staged)
        return staged

    def wait_staged(self) -> None:
        """Block until the pending snapshot no longer reads the live state (a no-op if none is)."""
        snapshot = self._snapshot
        if snapshot is not None:
            snapshot.staged.result()

    def __getstate__(self) -> dict[str, Any]:
        # AsyncCheckpointerType.PROCESS ships the writer to a daemon process: hand over the
        # finished snapshot's record locations (plain data), never threads or buffers.
        state = dict(self.__dict__)
        snapshot = state.pop("_snapshot", None)
        state["_shipped_result"] = None
        if snapshot is not None:
            state["_shipped_result"] = (str(snapshot.directory), snapshot.done.result())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._snapshot = None

    # -- StorageWriter: the write step -------------------------------------------------------
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        try:
            directory, result = self._finished_snapshot(plan, planner)
        except BaseException:
            self._end_save()  # finish() will not run: let the next save into this directory in
            raise
        if directory != self.path:  # staged before DCP's reset(checkpoint_id) moved the target
            for name in result.files:
                os.replace(Path(directory) / name, self.path / name)
        missing = [item.index.fqn for item in plan.items if item.index not in result.records]
        if missing:
            raise RuntimeError(
                f"items {missing[:5]} were planned but not staged; the state dict changed between "
                "async_save's staging and its save"
            )
        self.last_stats = result
        results = [_write_result(item, result.records[item.index]) for item in plan.items]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

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
        layout = plan_layout(planner, plan.items, prefix.prefix)
        snapshot = Snapshot(self.path, layout, planner.resolve_data, self.config, self._pool())
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
        try:
            storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
            metadata.storage_data = storage_data
            metadata.storage_meta = self.storage_meta()
            metadata.version = "1.0.0"
            # Fail closed: seal .metadata's own digest and each checksum side file's SHA-256 into it.
            seal_metadata(metadata, self.path, expected_checksum_files(self.path, {i.relative_path for i in storage_data.values()}))
            referenced = {info.relative_path for info in storage_data.values()}
            checksum_files = {checksum_file_name(_prefix_of(name)) for name in referenced}
            required = required_sizes((i.relative_path, i.offset, i.length) for i in storage_data.values())
            if self.config.checksums:  # every rank that wrote data wrote its checksums beside it
                required |= {name: 1 for name in checksum_files}
            claim = self._claim
            identity = claim.identity if claim is not None and claim.identity.path == self.path else None
            commit_checkpoint(
                identity or DirectoryIdentity.of(self.path),
                metadata,
                self.save_id[:8],
                fsync=self.config.fsync,
                required=required,
                keep=referenced | checksum_files,
            )
        finally:
            self._end_save()


def _write_result(item: WriteItem, where: RecordLocation) -> WriteResult:
    return WriteResult(
        index=item.index, size_in_bytes=where.length, storage_data=_StorageInfo(where.relative_path, where.offset, where.length)
    )


def _prefix_of(file_name: str) -> str:
    """``__0_ab12cd34_0.distcp`` -> ``__0_ab12cd34_`` (the save's per-rank file prefix)."""
    return file_name[: file_name.rindex("_") + 1]
