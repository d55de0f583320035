"""Copy many tensors in a few calls: what ``capture`` does with thousands of small tensors.

A state dict of a real model holds thousands of tensors no optimizer owns (buffers, EMA
copies, or everything before the first step). Copying them one by one costs the caller a
Python call, a torch dispatch and -- for a GPU tensor -- a kernel launch (to host: a
synchronisation) per tensor, all before ``dcp.async_save`` returns. Here tensors are
grouped by device and dtype and copied per group:

* CPU to CPU: into a process-wide *capture arena* -- page-aligned host memory faulted in
  once and reused by later saves -- with one ``torch.stack(..., out=)`` per shape and
  ``unbind`` for the views. Fresh memory is the real cost of copying a state aside on
  CPU: every page of a new allocation faults on first touch (what cloning tensor by tensor,
  and stock ``DefaultStager``, pay on every save); a reused arena does not. An arena is
  reused only once no tensor of an earlier capture views it any more (its ``mmap`` is
  no longer exported: see ``_Arena.free``), so a later save can never overwrite bytes an
  earlier snapshot still reads; at most the arenas of the saves in flight are kept, and
  ``release_capture_arenas`` frees the idle one.
* GPU to GPU: one flat buffer per group and ``torch._foreach_copy_`` into views of it: a
  few fused kernels on the caller's current stream instead of one launch per tensor.
* GPU to host: the group in slices of at most ``slice_bytes`` -- each gathered into one
  flat device buffer, copied to host memory in one transfer, and viewed as the tensors
  there -- so GPU memory grows by one slice at most, and there is one synchronisation per
  slice instead of one per tensor.

Only plain, dense, contiguous tensors without conjugate/negative bits and without
``requires_grad`` are batched (``batchable``); the caller copies anything else on its own.
Every copy is a view of private memory holding exactly the source's values, shape and dtype.
"""

from __future__ import annotations

import mmap
import sys
import threading
from collections.abc import Sequence

import torch

from dcp_datastates.buffer_pool import fault_in

#: Largest flat device buffer a GPU-to-host group is gathered in at once.
SLICE_BYTES = 64 * 1024**2

_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def batchable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` can be copied as part of a group (a dense block of its own bytes)."""
    return (
        type(tensor) in _PLAIN
        and tensor.layout is torch.strided
        and not tensor.requires_grad
        and not tensor.is_quantized
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.device.type in ("cpu", "cuda")
        and tensor.is_contiguous()
    )


def copy_tensors(tensors: Sequence[torch.Tensor], to_host: bool, slice_bytes: int = SLICE_BYTES) -> list[torch.Tensor]:
    """Private copies of ``tensors`` (each ``batchable``), in order; GPU tensors go to host memory if ``to_host``."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(i)
    with torch.no_grad():
        for (device, _dtype), indexes in groups.items():
            group = [tensors[i] for i in indexes]
            if device.type == "cpu":
                continue  # all CPU groups share one arena, below
            if to_host:
                copies = _gathered_to_host(group, slice_bytes)
            else:
                copies = _flat_on_device(group)
            for i, copied in zip(indexes, copies):
                out[i] = copied
        cpu = [indexes for (device, _dtype), indexes in groups.items() if device.type == "cpu"]
        if cpu:
            for indexes, copies in zip(cpu, _into_arena([[tensors[i] for i in group] for group in cpu])):
                for i, copied in zip(indexes, copies):
                    out[i] = copied
    return out  # type: ignore[return-value]


_ALIGN = 64  # each dtype's region starts on a cache line


class _Arena:
    """Faulted-in host memory for captured CPU tensors, reused once no tensor views it."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.memory = mmap.mmap(-1, nbytes)
        self._baseline = sys.getrefcount(self.memory)  # references while nothing views it
        probe = torch.frombuffer(self.memory, dtype=torch.uint8)
        fault_in(probe.data_ptr(), nbytes)  # once; later saves copy into memory already there
        del probe

    def free(self) -> bool:
        """No tensor views the arena: each tensor storage made by ``torch.frombuffer`` holds a reference to it."""
        return sys.getrefcount(self.memory) <= self._baseline


_arenas: list[_Arena] = []
_arenas_lock = threading.Lock()
#: Arenas made by this process (tests use it to prove reuse).
arenas_made = 0


def _arena_tensor(nbytes: int) -> torch.Tensor:
    """A uint8 tensor over a free arena of at least ``nbytes`` (taken: it holds the arena from now on)."""
    global arenas_made
    with _arenas_lock:
        free = [a for a in _arenas if a.free()]
        fits = [a for a in free if a.nbytes >= nbytes]
        if fits:
            arena = min(fits, key=lambda a: a.nbytes)
        else:
            for idle in free:  # too small for this state: replaced, not kept beside the new one
                _arenas.remove(idle)
                idle.memory.close()
            arena = _Arena(max(nbytes, 1 << 20))
            _arenas.append(arena)
            arenas_made += 1
        return torch.frombuffer(arena.memory, dtype=torch.uint8)  # taken, before the lock is released


def release_capture_arenas() -> int:
    """Free the arenas no capture uses any more (their memory goes back to the system); returns how many."""
    with _arenas_lock:
        idle = [a for a in _arenas if a.free()]
        for arena in idle:
            _arenas.remove(arena)
            arena.memory.close()
    return len(idle)


def _into_arena(groups: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Copies of each same-dtype CPU group, as views of one arena: one ``stack(out=)`` per shape."""
    sizes = [-(-sum(t.nbytes for t in group) // _ALIGN) * _ALIGN for group in groups]
    arena = _arena_tensor(sum(sizes))
    out: list[list[torch.Tensor]] = []
    offset = 0
    for group, size in zip(groups, sizes):
        region = arena[offset : offset + size]
        offset += size
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, tensor in enumerate(group):
            by_shape.setdefault(tuple(tensor.shape), []).append(i)
        copies: list[torch.Tensor | None] = [None] * len(group)
        at = 0  # bytes of the region used so far
        dtype = group[0].dtype
        for shape, members in by_shape.items():
            numel = group[members[0]].numel()
            nbytes = numel * group[members[0]].element_size() * len(members)
            block = region[at : at + nbytes].view(dtype).view(len(members), *shape)
            at += nbytes
            torch.stack([group[i] for i in members], out=block)
            for i, view in zip(members, block.unbind(0)):
                copies[i] = view
        out.append(copies)  # type: ignore[arg-type]
    return out


def _flat_on_device(group: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of one new flat buffer on the group's device, filled by ``torch._foreach_copy_``."""
    flat = torch.empty(sum(t.numel() for t in group), dtype=group[0].dtype, device=group[0].device)
    views = list(torch._utils._unflatten_dense_tensors(flat, group))
    torch._foreach_copy_(views, group)
    return views


def _gathered_to_host(group: list[torch.Tensor], slice_bytes: int) -> list[torch.Tensor]:
    """The group copied to host memory a slice at a time: gather on the device, one transfer, views on the host."""
    copies: list[torch.Tensor] = []
    start = 0
    while start < len(group):
        end, size = start, 0
        while end < len(group) and (end == start or size + group[end].nbytes <= slice_bytes):
            size += group[end].nbytes
            end += 1
        part = group[start:end]
        gathered = torch._utils._flatten_dense_tensors(part)  # one flat device buffer of this slice
        # copy=True: a one-tensor slice is gathered as a view of its source, never to be handed out as a copy.
        copies += torch._utils._unflatten_dense_tensors(gathered.to("cpu", copy=True), part)
        start = end
    return copies
