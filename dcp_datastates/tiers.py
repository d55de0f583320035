"""Multi-level checkpoints, the configuration: where the node-local tier lives and how copies travel.

A multi-level save commits each rank's files to its node's local directory first (the
save call costs what the local disk costs), sends a copy of them to a rank on a partner
node over ``torch.distributed``, and drains the checkpoint to the shared path in the
background. This module is the bottom floor of that feature: the pydantic model users
write, the node identity, and the directory layout every other tier module agrees on::

    <local_dir with {node}>/step-N/            this node's ranks' files + .metadata (+ .tier.json)
    <local_dir with {node}>/partner/step-N/    the partner node's files, copied here + .metadata
    <checkpoint_id, e.g. /shared/run/step-N>/  the drained copy: a plain, complete DCP checkpoint

The step directory's name is the checkpoint id's last component (``step-N``), so the
local copies of one run line up with its shared checkpoints by name.
"""

from __future__ import annotations

import os
import re
import socket
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dcp_datastates.errors import DataStatesError

#: Environment variable naming this process's node (wins over torchrun's GROUP_RANK and the host name).
NODE_ENV = "DCP_DATASTATES_NODE"
#: Sub-directory of a node's local root holding the copies of its partner node's files.
PARTNER_DIR = "partner"
#: Sub-directory of a node's local root where a restore puts files fetched from other nodes.
FETCHED_DIR = ".fetched"
#: Per-copy description of who wrote what (JSON), written before ``.metadata``.
MANIFEST_FILE = ".tier.json"
_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TierConfigError(DataStatesError, ValueError):
    """The multi-level configuration cannot work for this job (the message says which field and why)."""


class MultiLevelConfig(BaseModel):
    """The tiers of a multi-level checkpoint (``DataStatesConfig(multilevel=...)``).

    Example: ``MultiLevelConfig(local_dir="/local_nvme/{node}/ckpt", partners=1, drain_every=1)``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    local_dir: str = Field(
        description="Node-local directory (NVMe, or /dev/shm for host memory) that receives every checkpoint "
        "first; '{node}' is replaced by the node's name (DCP_DATASTATES_NODE, else torchrun's GROUP_RANK, "
        "else the host name). It must contain '{node}' unless the job runs on one node.",
    )
    partners: Literal[0, 1] = Field(
        1,
        description="Copies of each node's files kept on another node (0 or 1). The copy travels over the "
        "job's torch.distributed process group to the rank with the same local rank on the next node.",
    )
    drain_every: int = Field(
        1,
        ge=0,
        description="Also make every K-th local checkpoint durable on the shared path (the checkpoint_id), "
        "copied in the background; 1: all of them; 0: never (local tiers only).",
    )
    drain_policy: Literal["skip", "queue_one", "wait"] = Field(
        "queue_one",
        description="A checkpoint due for draining while the previous drain still runs: 'skip' (it is not "
        "drained), 'queue_one' (at most one waits; a newer one replaces it), 'wait' (the next save call "
        "waits until every checkpoint handed to the drain so far is on the shared path).",
    )
    keep_local: int = Field(
        2,
        ge=1,
        le=1000,
        description="Committed local (and partner) checkpoints kept per node; older ones are deleted once a "
        "newer one is committed on both its node and its partner (never one still being drained).",
    )
    free_space_margin: float = Field(
        1.1,
        ge=1.0,
        le=10.0,
        description="A save goes to the local tier only if every rank's local directory has at least this "
        "many times its checkpoint bytes free; else the whole save goes to the shared path, with a warning.",
    )

    @field_validator("local_dir")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"local_dir {value!r} is not a valid template ({exc}); write e.g. '/local_nvme/{{node}}/ckpt'") from None
        unknown = sorted({name for name in fields if name != "node"})
        if unknown:
            raise ValueError(
                f"local_dir {value!r} names {unknown}; only '{{node}}' may be used (e.g. '/local_nvme/{{node}}/ckpt')"
            )
        if not value.strip() or not os.path.isabs(value.replace("{node}", "n")):
            raise ValueError(f"local_dir must be an absolute path such as '/local_nvme/{{node}}/ckpt', got {value!r}")
        return value

    @property
    def has_node_field(self) -> bool:
        return "{node}" in self.local_dir

    def local_root(self, node: str) -> Path:
        return Path(self.local_dir.format(node=node))


def node_identity() -> str:
    """This process's node: ``DCP_DATASTATES_NODE``, else torchrun's ``GROUP_RANK``, else the host name."""
    explicit = os.environ.get(NODE_ENV)
    if explicit:
        if not _NODE_RE.match(explicit):
            raise TierConfigError(
                f"{NODE_ENV}={explicit!r} is not a usable node name: use letters, digits, '.', '_' or '-' "
                "(at most 128 characters, no '/')"
            )
        return explicit
    group_rank = os.environ.get("GROUP_RANK")
    if group_rank and group_rank.isdigit():
        return f"node{group_rank}"
    host = socket.gethostname().split(".")[0] or "localhost"
    return re.sub(r"[^A-Za-z0-9._-]", "_", host)[:128]


def step_dir_name(checkpoint_id: str | os.PathLike) -> str:
    """``/shared/run/step-12`` -> ``step-12`` (the name local copies share with the shared checkpoint)."""
    return Path(checkpoint_id).name


def local_step_dir(config: MultiLevelConfig, node: str, name: str) -> Path:
    return config.local_root(node) / name


def partner_step_dir(config: MultiLevelConfig, node: str, name: str) -> Path:
    return config.local_root(node) / PARTNER_DIR / name


@dataclass(frozen=True)
class Topology:
    """Which node each rank of the job runs on (gathered once, the same on every rank)."""

    nodes: tuple[str, ...]  # node of each global rank

    @property
    def world_size(self) -> int:
        return len(self.nodes)

    def node_names(self) -> list[str]:
        """Nodes in the order of their first rank (node i's partner is node i + 1, cyclically)."""
        return list(dict.fromkeys(self.nodes))

    def ranks_on(self, node: str) -> list[int]:
        return [rank for rank, name in enumerate(self.nodes) if name == node]

    def leader(self, node: str) -> int:
        """The rank that commits a node's directories: its lowest."""
        return self.ranks_on(node)[0]

    def partner_problem(self) -> str | None:
        """Why partner copies cannot be placed here, or None."""
        names = self.node_names()
        if len(names) < 2:
            return f"the job runs on one node ({names[0]!r}), so there is no other node to hold a partner copy"
        sizes = {name: len(self.ranks_on(name)) for name in names}
        if len(set(sizes.values())) != 1:
            return f"nodes run different numbers of ranks ({sizes}); partner copies pair ranks of equal local rank"
        return None

    def partner_node(self, node: str) -> str:
        names = self.node_names()
        return names[(names.index(node) + 1) % len(names)]

    def source_node(self, node: str) -> str:
        """The node whose files ``node`` holds as partner copies."""
        names = self.node_names()
        return names[(names.index(node) - 1) % len(names)]

    def partner_rank(self, rank: int) -> int:
        """Where ``rank``'s files go: the rank of the same local rank on the next node."""
        node = self.nodes[rank]
        return self.ranks_on(self.partner_node(node))[self.ranks_on(node).index(rank)]

    def source_rank(self, rank: int) -> int:
        """Whose files ``rank`` receives."""
        node = self.nodes[rank]
        return self.ranks_on(self.source_node(node))[self.ranks_on(node).index(rank)]
