"""Multi-level checkpoints, the collectives: small agreements and byte transfers over gloo groups.

Each tier thread (the caller's, the tier worker, the drain) owns one gloo group that no
other thread uses, and every rank issues the same sequence of calls on it. Without
``torch.distributed`` (one process) every call is the identity, so the same code runs a
single-process job.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def all_reduce_int(value: int, op: str, group: Any) -> int:
    """``value`` reduced over ``group`` with ``op`` ("min" or "max")."""
    if not distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX, group=group)
    return int(tensor.item())


def all_gather_object(obj: Any, group: Any) -> list[Any]:
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_bytes(data: bytes | None, src: int, group: Any) -> bytes | None:
    """``src``'s ``data`` on every rank; ``None`` travels as "nothing" (an abort)."""
    if not distributed():
        return data
    length = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64)
    dist.broadcast(length, src=src, group=group)
    n = int(length.item())
    if n < 0:
        return None
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if dist.get_rank() == src and n else torch.empty(n, dtype=torch.uint8)
    if n:
        dist.broadcast(buffer, src=src, group=group)
    return data if dist.get_rank() == src else buffer.numpy().tobytes()
