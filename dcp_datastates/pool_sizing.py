"""How big the host staging pool should be when ``host_pool_bytes="auto"``.

A lazy snapshot is only lazy if the whole state fits in the pool: then staging -- the part
the optimizer step waits for -- ends at copy speed and the disk catches up in the background.
A state larger than the pool streams through it at disk speed instead (DataStates-LLM sizes its
host cache to the checkpoint for this reason). So ``auto`` sizes the pool to this rank's
checkpoint bytes, capped by a share of the host memory that is actually available, split
between the ranks of this node: pinned memory cannot be swapped or reclaimed, and every local
rank sizes its own pool at about the same time.

Pure functions of plain numbers, so tests can feed them any machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Share of the available host memory (after the page cache is dropped) that this node's pools
#: may take together: the rest stays for data loaders, the page cache and the stock stager.
SAFE_HOST_SHARE = 0.5
#: Pool size while no save has reported its size yet (the pre-``auto`` default).
UNKNOWN_STATE_BYTES = 512 * 1024**2
#: A pool holds at least this many buffers, so that copying one overlaps writing another.
MIN_BUFFERS = 2


@dataclass(frozen=True)
class HostMemory:
    """What this process may use: available bytes on the host (or in its cgroup) and local ranks."""

    available_bytes: int
    local_ranks: int
    source: str  # where available_bytes came from, for the log line

    @property
    def share_bytes(self) -> int:
        """This rank's cap: a safe share of what is available, split between the node's ranks."""
        return int(self.available_bytes * SAFE_HOST_SHARE) // max(1, self.local_ranks)


@dataclass(frozen=True)
class PoolSize:
    buffers: int
    fits: bool  # the whole state fits (staging at copy speed) or it streams through the pool
    reason: str  # one sentence for the log: the size and why

    def nbytes(self, chunk_bytes: int) -> int:
        return self.buffers * chunk_bytes


def buffers_for(state_bytes: int, chunk_bytes: int) -> int:
    """Buffers that hold ``state_bytes`` whole (each save's tail fills at most one more)."""
    return max(MIN_BUFFERS, -(-state_bytes // chunk_bytes))


def size_pool(state_bytes: int | None, chunk_bytes: int, memory: HostMemory) -> PoolSize:
    """The auto pool for a state of ``state_bytes`` (``None``: not known yet) on ``memory``."""
    cap = max(MIN_BUFFERS, memory.share_bytes // chunk_bytes)
    where = (
        f"{_gib(memory.share_bytes)} cap = {SAFE_HOST_SHARE:.0%} of {_gib(memory.available_bytes)} available "
        f"({memory.source}) / {memory.local_ranks} local rank(s)"
    )
    if state_bytes is None:
        wanted = buffers_for(UNKNOWN_STATE_BYTES, chunk_bytes)
        buffers = min(wanted, cap)
        return PoolSize(buffers, False, f"{_gib(buffers * chunk_bytes)}: the state's size is not known yet ({where})")
    wanted = buffers_for(state_bytes, chunk_bytes)
    if wanted <= cap:
        return PoolSize(wanted, True, f"{_gib(wanted * chunk_bytes)}: holds this rank's {_gib(state_bytes)} of "
                                      f"checkpoint bytes whole, in {wanted} buffers of {_gib(chunk_bytes)} ({where})")
    return PoolSize(
        cap, False,
        f"{_gib(cap * chunk_bytes)}: this rank's {_gib(state_bytes)} of checkpoint bytes cannot fit under the {where}; "
        "the rest streams through the pool, so staging lasts until it reaches the disk. Free host memory, "
        "run fewer ranks per node, or set host_pool_bytes explicitly",
    )


def host_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> HostMemory:
    """Available host memory now (the tighter of the host's and this cgroup's) and local ranks.

    ``MemAvailable`` counts reclaimable page cache, which is right for a pool that is faulted
    in once; a container's cgroup limit can be far tighter than the host's memory, and the
    OOM killer enforces it, so it is honoured when set. ``LOCAL_WORLD_SIZE`` is torchrun's.
    """
    available, source = None, "MemAvailable"
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        source = "free pages"
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            headroom = max(0, int(limit) - int((cgroup / "memory.current").read_text().strip()))
            if headroom < available:
                available, source = headroom, "cgroup memory.max - memory.current"
    except (OSError, ValueError):
        pass
    return HostMemory(available, _local_world_size(), source)


def _local_world_size() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"
