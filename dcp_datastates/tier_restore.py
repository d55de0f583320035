"""Multi-level checkpoints, the restore: the newest step the whole job can load, each file from its nearest copy.

``restore(state_dict, shared_root, config)`` is collective (every rank calls it, on the
caller's thread, over the default process group):

1. **Stock-taking.** Each node's lowest rank lists the copies on its node (its own local
   copies and the partner copies it holds), rank 0 the shared ones (``tier_files.inventory``:
   committed, sealed, which files are whole), and every rank learns them all.
2. **One step for the job.** The newest save -- a step *and* its sealed ``.metadata``
   digest, so two saves that used one step name never mix -- every file of which is whole in
   some usable copy. Local and partner copies are usable only by a job of the world size
   that wrote them; a job of another size (resharding) restores from the shared path.
3. **One source per file.** The coordinator (``prepare_global_plan``) sees which files
   each rank's load needs and picks, per file: a copy on the rank's own node (its own
   directory, else the partner copy it holds), else a copy on another node -- fetched over
   the process group by one rank of the node into ``<local root>/.fetched`` -- else the
   shared path.
4. **Read, verify, deliver** as ``DataStatesReader`` does: every byte is checked against
   the checksums sealed at save time. A copy found damaged while reading (a flipped bit, a
   file torn since the stock-taking) is excluded and the load runs again, the file then
   coming from its next copy; a step with no intact copy of some file is not chosen.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from dcp_datastates.checksums import CHECKSUM_FILE_SUFFIX, MAX_CHECKSUM_FILE_BYTES, parse_checksum_file, read_regular_file, sha256_hex
from dcp_datastates.config import DataStatesConfig
from dcp_datastates.errors import (
    ChecksumMismatchError,
    CheckpointIOError,
    DataStatesError,
    IncompleteCheckpointError,
    UnverifiedCheckpointError,
)
from dcp_datastates.integrity import IntegrityPolicy
from dcp_datastates.metadata_check import integrity_record, seal_findings, unverified_error
from dcp_datastates.reader import DataStatesReader
from dcp_datastates.tier_comm import all_gather_object, all_reduce_int, distributed, rank as global_rank, world_size
from dcp_datastates.tier_files import (
    CopyInventory,
    NewFile,
    inventory,
    make_copy_dir,
    open_source,
    parse_metadata,
    read_metadata_bytes,
    step_directories,
    write_at,
)
from dcp_datastates.tiers import FETCHED_DIR, PARTNER_DIR, MultiLevelConfig, Topology, node_identity

logger = logging.getLogger("dcp_datastates")

#: Loads tried before a restore gives up (each failed one excludes the damaged copies it found).
MAX_ATTEMPTS = 3
_CHUNK = 16 * 1024**2


@dataclass(frozen=True)
class HeldCopy:
    """A copy and the node it lives on (``None``: the shared path)."""

    host: str | None
    inv: CopyInventory

    def key(self, name: str) -> tuple[str | None, str, str]:
        return (self.host, self.inv.kind, name)


@dataclass(frozen=True)
class Choice:
    """The save a restore loads: its step, digest, and the usable copies of its files."""

    step: int
    name: str
    digest: str
    copies: tuple[HeldCopy, ...]
    referenced: frozenset[str]


@dataclass(frozen=True)
class Transfer:
    src: int
    dst: int
    source: str  # path on the source rank's node
    target: str  # path on the destination rank's node
    size: int


@dataclass(frozen=True)
class TierReadInfo:
    """One rank's read plan: each needed file's path and origin, and the job's transfers (the same everywhere)."""

    paths: dict[str, tuple[str, str, tuple[str | None, str, str]]]  # file -> (kind, path, origin copy key)
    transfers: tuple[Transfer, ...]


@dataclass
class RestoreResult:
    """What a restore loaded on this rank, and from where."""

    step: int
    name: str
    shared_path: Path
    bytes_local: int = 0  # read from copies on this rank's node (own directory or the partner copy it holds)
    bytes_fetched: int = 0  # received over the process group from another node's copy
    bytes_shared: int = 0  # read from the shared path
    sources: dict[str, str] = field(default_factory=dict)  # data file -> "local", "partner", "fetched" or "shared"
    attempts: int = 1


# -- 1 and 2: stock-taking and the choice -------------------------------------------------------------
def _topology() -> Topology:
    return Topology(tuple(all_gather_object(node_identity(), None)))


def _scan(ml: MultiLevelConfig, shared_root: Path, topo: Topology, policy: IntegrityPolicy) -> list[HeldCopy]:
    """Every usable copy the job holds (collective). Raises when copies exist but ``policy`` refused them all."""
    me = global_rank()
    node = topo.nodes[me]
    found: list[HeldCopy] = []
    refused: list[str] = []
    if topo.leader(node) == me:
        root = ml.local_root(node)
        for kind, directory in (("local", root), ("partner", root / PARTNER_DIR)):
            for path in step_directories(directory):
                inv = inventory(path, kind, policy, refused)
                if inv is not None:
                    found.append(HeldCopy(node, inv))
    if me == 0:
        for path in step_directories(shared_root):
            inv = inventory(path, "shared", policy, refused)
            if inv is not None:
                found.append(HeldCopy(None, inv))
    parts = all_gather_object((found, refused), None)
    copies = [copy for part, _ in parts for copy in part]
    reasons = [why for _, part in parts for why in part]
    if reasons and not copies:  # never a silent fresh start because the policy refused what is there
        raise UnverifiedCheckpointError(
            f"no checkpoint copy under {str(shared_root)!r} or the local tiers can be restored as {policy.name} "
            f"demands ({len(reasons)} refused; e.g. {reasons[0]}). Restore with the key the job saved with, or "
            "without the policy if you trust these copies.")
    return copies


def choose(copies: list[HeldCopy], world: int, excluded: set[tuple[str | None, str, str]], step: int | None = None) -> Choice | None:
    """The newest save every file of which is whole in some usable copy (the same answer on every rank)."""
    by_save: dict[tuple[int, str], list[HeldCopy]] = {}
    for copy in copies:
        usable = copy.inv.kind == "shared" or copy.inv.world_size == world
        if usable and (step is None or copy.inv.step == step):
            by_save.setdefault((copy.inv.step, copy.inv.digest), []).append(copy)
    for (number, digest), held in sorted(by_save.items(), key=lambda item: (-item[0][0], item[0][1])):
        referenced = held[0].inv.referenced
        whole = {name for c in held for name in c.inv.intact if c.key(name) not in excluded}
        if referenced <= whole:
            return Choice(number, Path(held[0].inv.directory).name, digest, tuple(held), referenced)
    return None


def find_restorable(shared_root: str | os.PathLike, config: DataStatesConfig, *, step: int | None = None) -> Choice | None:
    """Collective: the save ``restore`` would load (``latest_complete_checkpoint`` for multi-level runs)."""
    ml = _multilevel(config)
    topo = _topology()
    return choose(_scan(ml, Path(shared_root), topo, IntegrityPolicy.of(config)), topo.world_size, set(), step)


# -- 3 and 4: the reader ---------------------------------------------------------------------------------
class TierReader(DataStatesReader):
    """``DataStatesReader`` whose files come from several copies (see the module docstring)."""

    def __init__(self, choice: Choice, metadata_bytes: bytes, topo: Topology, ml: MultiLevelConfig, shared_path: Path,
                 excluded: set[tuple[str | None, str, str]], config: DataStatesConfig) -> None:
        super().__init__(shared_path, config=config, replicated_reads="every_rank")
        self.choice, self.topo, self.ml, self.excluded = choice, topo, ml, excluded
        self.metadata_bytes = metadata_bytes
        self.paths: dict[str, tuple[str, str, tuple[str | None, str, str]]] = {}
        self.bad: set[tuple[str | None, str, str]] = set()
        self.bytes_fetched = 0

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = parse_metadata(self.metadata_bytes, f"{self.choice.name}/.metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        record = integrity_record(metadata)
        if record is None or record.metadata_sha256 != self.choice.digest:
            raise IncompleteCheckpointError(f"{self.choice.name}: .metadata is not the one chosen for this restore")
        found = seal_findings(record, self.integrity, f"{self.choice.name}/.metadata")  # the key, on these very bytes
        if found.forged is not None:
            raise found.forged.exception()
        if self.integrity.enforced and found.unverified:
            raise unverified_error(self.choice.name, self.integrity, found.unverified)
        self.seal = record
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Coordinator: one source per file per rank; one fetch per (node, file) from another node's copy."""
        topo, choice = self.topo, self.choice
        fetched: dict[tuple[str, str], str] = {}
        transfers: list[Transfer] = []
        per_rank: list[dict[str, tuple[str, str, tuple[str | None, str, str]]]] = []
        for r, plan in enumerate(plans):
            node = topo.nodes[r]
            paths: dict[str, tuple[str, str, tuple[str | None, str, str]]] = {}
            for name in sorted(self._needed(plan)):
                holders = [c for c in choice.copies if name in c.inv.intact and c.key(name) not in self.excluded]
                here = sorted((c for c in holders if c.host == node), key=lambda c: c.inv.kind != "local")
                there = [c for c in holders if c.host is not None and c.host != node]
                shared = [c for c in holders if c.host is None]
                if here:
                    paths[name] = (here[0].inv.kind, str(Path(here[0].inv.directory) / name), here[0].key(name))
                elif there:
                    copy = there[(len(transfers)) % len(there)]  # spread fetches over the nodes that hold the file
                    target = str(self.ml.local_root(node) / FETCHED_DIR / choice.name / name)
                    if (node, name) not in fetched:
                        fetched[(node, name)] = target
                        transfers.append(Transfer(topo.leader(copy.host), r, str(Path(copy.inv.directory) / name), target,
                                                  copy.inv.sizes[name]))
                    paths[name] = ("fetched", target, copy.key(name))
                elif shared:
                    paths[name] = ("shared", str(Path(shared[0].inv.directory) / name), shared[0].key(name))
                else:
                    raise IncompleteCheckpointError(f"{choice.name}: no intact copy of {name} is left (internal error)")
            per_rank.append(paths)
        return [dataclasses.replace(plan, storage_data=TierReadInfo(paths, tuple(transfers)))
                for plan, paths in zip(plans, per_rank)]

    def _needed(self, plan: LoadPlan) -> set[str]:
        data = {self.storage_data[item.storage_index].relative_path for item in plan.items}
        side = {name for name in self.choice.referenced if name.endswith(CHECKSUM_FILE_SUFFIX)}
        return data | {s for s in side if any(d.startswith(s[: -len(CHECKSUM_FILE_SUFFIX)]) for d in data)}

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        info: TierReadInfo = plan.storage_data
        self.paths = info.paths
        self._run_transfers(info.transfers)
        self.last_read = type(self.last_read)()
        self.checksums = {}
        for name, (_, path, origin) in sorted(self.paths.items()):
            if name.endswith(CHECKSUM_FILE_SUFFIX):
                self._load_side_file(name, Path(path), origin)
        if plan.items:
            self._read_items(plan.items, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _run_transfers(self, transfers: tuple[Transfer, ...]) -> None:
        """Every rank walks the same list; each transfer is a send on its source and a receive on its target."""
        me = global_rank()
        error: BaseException | None = None
        for t in transfers:
            if me not in (t.src, t.dst):
                continue
            source: int | None = None
            target: NewFile | None = None
            try:
                if me == t.dst:
                    make_copy_dir(Path(t.target).parent)
                    target = NewFile(Path(t.target).parent, Path(t.target).name)
                else:
                    source = open_source(Path(t.source))
            except OSError as exc:
                error = error or exc
            try:
                for offset in range(0, t.size, _CHUNK):
                    n = min(_CHUNK, t.size - offset)
                    if me == t.src:
                        data = os.pread(source, n, offset) if source is not None and error is None else b""
                        if len(data) != n:
                            error = error or CheckpointIOError(f"{t.source} is shorter than when it was listed")
                            data = bytes(n)
                        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=t.dst)
                    else:
                        buffer = torch.empty(n, dtype=torch.uint8)
                        dist.recv(buffer, src=t.src)
                        if target is not None and error is None:
                            try:
                                write_at(target.fd, memoryview(buffer.numpy()), offset)
                            except OSError as exc:
                                error = exc
                        self.bytes_fetched += n
                if target is not None and error is None:
                    target.publish(fsync=True)
            except OSError as exc:
                error = error or exc
            finally:
                if source is not None:
                    os.close(source)
                if target is not None:
                    target.close()
        failed = all_reduce_int(-1 if error is None else me, "max", None)
        if error is not None:
            raise CheckpointIOError(f"fetching checkpoint files from another node failed: {error}") from error
        if failed >= 0:
            raise CheckpointIOError(f"rank {failed} failed while fetching checkpoint files from another node; its error says why")

    def _load_side_file(self, name: str, path: Path, origin: tuple[str | None, str, str]) -> None:
        expected = self.seal.checksum_files.get(name)
        raw = read_regular_file(path, MAX_CHECKSUM_FILE_BYTES, "checksum file")
        if expected is None or sha256_hex(raw) != expected:
            self.bad.add(origin)
            raise ChecksumMismatchError(f"checksum file {path} differs from the one sealed in {self.choice.name}/.metadata")
        self.checksums.update(parse_checksum_file(raw, name))

    def _data_path(self, relative_path: str) -> Path:
        return Path(self.paths[relative_path][1])

    def _check_size(self, relative_path: str, size: int, fqn: str) -> None:
        try:
            super()._check_size(relative_path, size, fqn)
        except DataStatesError:
            self.bad.add(self.paths[relative_path][2])
            raise

    def _verify(self, window: Any, data: memoryview, checksums: Any, relative_path: str) -> None:
        try:
            super()._verify(window, data, checksums, relative_path)
        except DataStatesError:
            self.bad.add(self.paths[relative_path][2])
            raise


# -- the entry point ------------------------------------------------------------------------------------
def restore(state_dict: dict[str, Any], shared_root: str | os.PathLike, config: DataStatesConfig, *,
            step: int | None = None, planner: LoadPlanner | None = None) -> RestoreResult | None:
    """Load the newest save the job can restore as a whole into ``state_dict`` (collective; see the module doc).

    Returns what this rank read from where, or ``None`` when no save is restorable (a fresh start).
    ``step`` restricts the choice to that step.
    """
    ml = _multilevel(config)
    shared_root = Path(shared_root)
    topo = _topology()
    me = global_rank()
    fetched_root = ml.local_root(topo.nodes[me]) / FETCHED_DIR
    copies = _scan(ml, shared_root, topo, IntegrityPolicy.of(config))
    excluded: set[tuple[str | None, str, str]] = set()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        choice = choose(copies, topo.world_size, excluded, step)
        if choice is None:
            return None
        metadata_bytes, from_shared = _metadata_of(choice, topo)
        reader = TierReader(choice, metadata_bytes, topo, ml, shared_root / choice.name, excluded, config)
        error: BaseException | None = None
        try:
            dcp.load(state_dict, storage_reader=reader, planner=planner)
        except (CheckpointException, DataStatesError, OSError) as exc:
            error = exc
        bad = {key for part in all_gather_object(sorted(reader.bad, key=str), None) for key in part}
        if topo.leader(topo.nodes[me]) == me:
            shutil.rmtree(fetched_root, ignore_errors=True)
        if error is None:
            result = RestoreResult(choice.step, choice.name, shared_root / choice.name, attempts=attempt,
                                   bytes_fetched=reader.bytes_fetched, bytes_shared=from_shared)
            for name, n in reader.last_read.bytes_by_file.items():
                kind = reader.paths[name][0]
                result.sources[name] = kind
                if kind == "shared":
                    result.bytes_shared += n
                elif kind in ("local", "partner"):
                    result.bytes_local += n
            return result
        if not bad - excluded:
            raise error
        logger.warning("dcp_datastates: restore of %s found damaged copies %s; loading again from the next copies",
                       choice.name, sorted(bad - excluded, key=str))
        excluded |= bad
    raise IncompleteCheckpointError(f"restore gave up after {MAX_ATTEMPTS} attempts: every try found another damaged copy")


def _metadata_of(choice: Choice, topo: Topology) -> tuple[bytes, int]:
    """The chosen ``.metadata``'s bytes on every rank: from a rank with a node-local copy, else from the shared path."""
    local_hosts = {c.host for c in choice.copies if c.host is not None}
    holders = [r for r in range(topo.world_size) if topo.nodes[r] in local_hosts]
    src = min(holders) if holders else 0
    data: list[Any] = [None]
    if global_rank() == src:
        copy = next(c for c in choice.copies if c.host == topo.nodes[src]) if holders else next(c for c in choice.copies if c.host is None)
        data[0] = read_metadata_bytes(Path(copy.inv.directory))
    if distributed() and world_size() > 1:
        dist.broadcast_object_list(data, src=src)
    shared_bytes = len(data[0]) if not holders and global_rank() == src else 0
    return data[0], shared_bytes


def _multilevel(config: DataStatesConfig) -> MultiLevelConfig:
    if config.multilevel is None:
        raise ValueError("restore needs the DataStatesConfig the job saves with, with multilevel=MultiLevelConfig(...) set")
    return config.multilevel
