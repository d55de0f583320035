"""Multi-level checkpoints, the save: what ``DataStatesWriter`` does differently when tiers are configured.

Three hooks, one per point where a multi-level save differs from a plain one:

* ``begin`` (caller's thread: ``stage()``, or ``prepare_local_plan`` under ``dcp.save``):
  the tier runtime exists (made now the first time: a collective), ``drain_policy='wait'``
  waits here, and the ranks agree whether the save fits on every local disk. If it does,
  the writer's directory becomes this node's local step directory; if not, the whole save
  goes to the shared path as a plain checkpoint, with a warning.
* ``write_data`` (upload thread, every rank): after this rank's files are written and
  fsynced, the ranks agree over the save's own process group that all succeeded, and learn
  each other's files and side-file digests -- a failure anywhere fails the save on every
  rank, so no tier worker waits for a save that is not coming. Then the save is handed to
  the tier worker.
* ``finish`` (coordinator): seals ``.metadata`` with every rank's side-file digests,
  commits the coordinator node's local copy, and hands the bytes to the tier worker,
  which distributes them; on any failure it hands over ``None`` (abort) instead.

The gap left: a coordinator that dies between the agreement and ``finish`` leaves the
other tier workers waiting in a broadcast until the process group times out (or, as under
torchrun, the job is torn down).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from dcp_datastates.checksums import checksum_file_name, read_regular_file, sha256_hex, MAX_CHECKSUM_FILE_BYTES
from dcp_datastates.commit import has_complete_checkpoint, pickle_metadata
from dcp_datastates.errors import CheckpointExistsError, CheckpointIOError
from dcp_datastates.integrity import IntegrityPolicy
from dcp_datastates.metadata_check import seal_metadata_with
from dcp_datastates.resume import step_of
from dcp_datastates.tier_comm import all_gather_object, distributed, rank as global_rank, world_size
from dcp_datastates.tier_files import Manifest, commit_copy
from dcp_datastates.tier_runtime import RankFiles, TierJob, TierOutcome, TierRuntime
from dcp_datastates.tiers import TierConfigError, local_step_dir, step_dir_name

if TYPE_CHECKING:
    from dcp_datastates.writer import DataStatesWriter

logger = logging.getLogger("dcp_datastates")

#: Room a local save needs beyond its tensor bytes: objects, checksum side file, manifest, ``.metadata``.
LOCAL_OVERHEAD_BYTES = 256 * 1024


@dataclass
class TierSave:
    """One multi-level save, from ``begin`` to ``finish``."""

    runtime: TierRuntime
    shared_path: Path
    local_path: Path | None  # None: this save went to the shared path (a local disk lacked the room)
    process_group: Any
    staged: bool  # begun by stage() (async_save) rather than prepare_local_plan (save)
    seq: int | None = None
    reports: list[RankFiles] | None = None
    outcome: TierOutcome | None = None

    @property
    def local(self) -> bool:
        return self.local_path is not None

    def matches(self, checkpoint_id: Any) -> bool:
        """Whether DCP's ``reset(checkpoint_id)`` names this save's checkpoint (the shared path)."""
        return not checkpoint_id or os.path.abspath(checkpoint_id) == os.path.abspath(self.shared_path)


def begin(writer: "DataStatesWriter", state_bytes: int, process_group: Any, *, staged: bool) -> TierSave:
    """On the caller's thread, every rank: decide where this save's files go (see the module docstring)."""
    ml = writer.config.multilevel
    assert ml is not None
    shared = writer.path
    name = step_dir_name(shared)
    if step_of(name) is None:
        raise TierConfigError(
            f"multi-level checkpoints need step-named checkpoint ids (the last component is 'step-N', 'step_N' or 'N'), "
            f"got {str(shared)!r}: restore orders local copies by that number")
    if process_group is not None and distributed() and process_group.size() != world_size():
        raise TierConfigError(
            f"a multi-level save runs on every rank of the job: process_group has {process_group.size()} of "
            f"{world_size()} ranks; pass a group of all ranks (e.g. dist.new_group(backend='gloo'))")
    runtime = TierRuntime.get()
    runtime.check_config(writer.config)
    if ml.drain_policy == "wait":
        runtime.wait_for_drains()
    if has_complete_checkpoint(shared) and not writer.overwrite:
        raise CheckpointExistsError(
            f"Checkpoint already exists and overwrite=False: {str(shared)!r} holds a complete checkpoint (.metadata "
            "present). Save to a new directory, or leave overwrite at its default (True) to replace it once this save "
            "is drained.")
    local = local_step_dir(ml, runtime.node, name)
    needed = int(state_bytes * ml.free_space_margin) + LOCAL_OVERHEAD_BYTES
    free = _free_bytes(local.parent)
    fits = runtime.agree_min(int(free >= needed))
    if not fits:
        logger.warning(
            "dcp_datastates: %s goes to the shared path %s, not the local tier: %s (this rank: %d MiB free in %s, "
            "%d MiB needed); free local space or lower keep_local",
            name, shared, "this node's local disk lacks the room" if free < needed else "another rank's local disk lacks the room",
            free >> 20, local.parent, needed >> 20)
        return TierSave(runtime, shared, None, process_group, staged)
    writer.path = local
    return TierSave(runtime, shared, local, process_group, staged)


def _free_bytes(directory: Path) -> int:
    """Free bytes where ``directory`` is (created if missing); 0 where it cannot be made."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(directory).free
    except OSError as exc:
        logger.warning("dcp_datastates: local tier directory %s is unusable (%s)", directory, exc)
        return 0


def state_bytes(state_dict: Any) -> int:
    """Tensor bytes of a state dict held by this rank (DTensors: their local shard)."""
    total = 0
    stack = [state_dict]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.numel() * local.element_size()
    return total


def plan_bytes(plan: SavePlan) -> int:
    """Tensor bytes a local save plan writes (``dcp.save``: the state dict is not seen before planning)."""
    total = 0
    for item in plan.items:
        if item.tensor_data is not None:
            total += item.tensor_data.size.numel() * item.tensor_data.properties.dtype.itemsize
    return total


def write_data(tier: TierSave, writer: "DataStatesWriter", plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
    """Write this rank's files, then agree with every rank that all of them did; hand the save to the tier worker."""
    error: BaseException | None = None
    files: dict[str, int] = {}
    digests: dict[str, str] = {}
    future: Future[list[WriteResult]] | None = None
    try:
        future = writer._write_files(plan, planner)
        names = {r.storage_data.relative_path for r in future.value()}
        side = checksum_file_name(plan.storage_data.prefix)
        if (writer.path / side).is_file():
            digests[side] = sha256_hex(read_regular_file(writer.path / side, MAX_CHECKSUM_FILE_BYTES, "checksum file"))
            names.add(side)
        files = {name: os.stat(writer.path / name).st_size for name in sorted(names)}
    except BaseException as exc:  # noqa: BLE001 - every rank must reach the agreement
        error = exc
    me = global_rank()
    reports: list[RankFiles] = all_gather_object(
        RankFiles(me, None if error is None else f"{type(error).__name__}: {error}", files, digests), tier.process_group)
    failed = [r for r in reports if r.error is not None]
    if error is not None:
        raise error
    if failed:
        raise CheckpointIOError(
            f"rank {failed[0].rank} failed writing its part of {tier.shared_path.name} ({failed[0].error}); no tier "
            "copy of this save is committed, the previous checkpoints are untouched")
    tier.reports = sorted(reports, key=lambda r: r.rank)
    tier.seq = tier.runtime.next_seq()
    tier.outcome = TierOutcome(tier.seq, tier.shared_path.name)
    claim = writer._claim
    tier.runtime.submit(TierJob(
        tier.seq, tier.shared_path.name, writer.config, tier.shared_path, writer.path,
        claim.identity if claim is not None else None, writer.save_id[:8],
        writer.overwrite, tier.reports, tier.outcome))
    assert future is not None
    return future


def finish(tier: TierSave, writer: "DataStatesWriter", metadata: Metadata, results: list[list[WriteResult]]) -> None:
    """Coordinator: seal ``.metadata``, commit this node's local copy, hand the bytes to the tier worker (or abort)."""
    assert tier.seq is not None and tier.reports is not None
    data: bytes | None = None
    try:
        storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        metadata.storage_data = storage_data
        metadata.storage_meta = writer.storage_meta()
        metadata.version = "1.0.0"
        seal_metadata_with(metadata, {name: sha for r in tier.reports for name, sha in r.side_digests.items()},
                           checksums=writer.config.checksums, key=IntegrityPolicy.of(writer.config).key)
        payload = pickle_metadata(metadata)
        topo = tier.runtime.topology
        node_ranks = topo.ranks_on(topo.nodes[0])
        required = {name: size for r in node_ranks for name, size in tier.reports[r].files.items()}
        claim, interrupt = writer._claim, writer._interrupt
        commit_copy(writer.path, payload,
                    Manifest(tier.shared_path.name, writer.save_id[:8], topo.world_size, "local", topo.nodes[0], tuple(node_ranks)),
                    required, fsync=writer.config.fsync, identity=claim.identity if claim is not None else None,
                    commit_point=interrupt.commit_point if interrupt is not None else None)
        data = payload
    except BaseException:
        # Not published (Ctrl-C, SIGTERM, a refused commit): no copy of this save will ever be committed
        # (the tier worker aborts on data=None), so this node's files of it go, as in a single-tier save
        interrupt = writer._interrupt
        if interrupt is not None and not interrupt.committing:
            interrupt.remove_files(all_ranks=True)
        raise
    finally:
        tier.runtime.post_metadata(tier.seq, data)
        writer._end_save()
