"""What a lazy snapshot may read later, and what must be copied before ``stage()`` returns.

A lazy snapshot reads live tensors *after* ``dcp.async_save`` has returned: that is exact
only for state nothing writes until the snapshot's copies are done. While a snapshot of
this process reads live state, every ``torch.optim`` optimizer's step waits for it (the
step guard below), so the parameters and optimizer state of the optimizers we know can be
read lazily. Everything else in the state dict can change in the very next forward:
BatchNorm running statistics and ``num_batches_tracked``, float8 amax/scale history, EMA
copies, mutable Python objects (scheduler lists, data-loader state). Those are *captured*
here, on the caller's thread, before ``stage()`` returns.

Known optimizers are those seen stepping in this process (the step guard notes each one)
plus those passed to ``install_optimizer_guard``. A tensor counts as owned when its memory
(``data_ptr``) is that of a parameter or a state tensor of a known optimizer; anything
else -- including a view that starts elsewhere in a parameter -- is copied (conservative:
a wrong guess costs a copy, never a torn checkpoint).

How a capture copies (plain dense tensors in groups, see ``batch_copy``; others one by one):
* CPU tensors: a clone on the caller's thread.
* CUDA tensors, when an optimizer is known: a clone on the caller's current stream. It is
  ordered after every kernel queued before the save and before every kernel queued after
  it, and costs no host synchronisation. What is captured (buffers, EMA) is small next to
  parameters and optimizer state, so GPU memory grows by that much only.
* CUDA tensors, when no optimizer is known (a checkpoint before the first step, or a loop
  that updates parameters by hand): every tensor is "not owned", and cloning the whole
  state on the GPU would double GPU memory. They are copied to host memory instead,
  synchronously -- what stock ``DefaultStager`` does -- and a log line says so once.
* At most ``budget_bytes`` (the writer passes its host pool size, at least 512 MiB) are copied aside. When
  more than that is unguarded -- a large state with no known optimizer -- nothing is
  copied and the writer stages synchronously instead: ``stage()`` returns once the
  snapshot has copied everything through the pool (exact, memory bounded by the pool,
  not lazy). Memory never grows by more than the pool plus the budget per save.

The step guard itself (a global optimizer pre-step hook that also notes each optimizer it
sees stepping) lives in ``step_guard``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from dcp_datastates.batch_copy import batchable, copy_tensors
from dcp_datastates.step_guard import known_optimizers, note_optimizer  # noqa: F401 - note_optimizer re-exported

logger = logging.getLogger(__name__)

#: Python objects that cannot change in place: shared with the snapshot as they are.
_IMMUTABLE = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)

_warned_no_optimizer = False

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # ``type() in`` first: isinstance on a tensor subclass check is the slow part of a 20,000-tensor walk.
    if type(tensor) in _PLAIN:
        return tensor
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


_PLAIN_SET = frozenset(_PLAIN)
_data_ptr = torch.Tensor.data_ptr


def _add_data_ptrs(owned: set[int], tensors: list[Any]) -> None:
    if set(map(type, tensors)) <= _PLAIN_SET:  # the usual case, at C speed: no Python frame per tensor
        owned.update(map(_data_ptr, tensors))
        return
    for value in tensors:
        if isinstance(value, torch.Tensor):
            owned.add(_local(value).data_ptr())


def owned_data_ptrs(optimizers: list[torch.optim.Optimizer]) -> set[int]:
    """Start addresses of every parameter and state tensor of ``optimizers``."""
    owned: set[int] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            _add_data_ptrs(owned, group["params"])
        for state in optimizer.state.values():
            _add_data_ptrs(owned, list(state.values()))
    owned.discard(0)  # empty tensors
    return owned


@dataclass
class CapturedState:
    """The state dict the snapshot reads: live where owned by a guarded optimizer, private copies elsewhere."""

    state_dict: dict[str, Any]
    #: ``id`` of every private tensor copy (kept alive by ``state_dict``): the snapshot need not copy them again.
    private_ids: set[int] = field(default_factory=set)
    tensors_captured: int = 0
    bytes_captured: int = 0
    objects_copied: int = 0
    optimizers_known: int = 0
    to_host: bool = False  # CUDA captures went to host memory (no optimizer known)
    #: more than ``budget_bytes`` is unguarded: nothing was copied, the caller must stage synchronously.
    over_budget: bool = False


def capture_mutable(state_dict: Mapping[str, Any], budget_bytes: int) -> CapturedState:
    """Copy what training may change before the snapshot reads it; share the rest.

    The structure is walked the way DCP's ``traverse_state_dict`` walks it (mappings, and
    lists holding tensors or mappings, are containers; everything else is a leaf), so the
    rebuilt state dict flattens to exactly the same keys as the original.
    """
    global _warned_no_optimizer
    optimizers = known_optimizers()
    owned = owned_data_ptrs(optimizers)
    out = CapturedState({}, optimizers_known=len(optimizers))
    to_host = not optimizers
    if to_host and not _warned_no_optimizer and torch.cuda.is_available() and torch.cuda.is_initialized():
        _warned_no_optimizer = True
        logger.warning(
            "dcp_datastates: no torch.optim optimizer has stepped in this process yet, so no GPU tensor of the "
            "state dict is known to be guarded; this save copies the GPU state to host memory before "
            "async_save returns (as stock DefaultStager does). After the first optimizer.step() -- or after "
            "install_optimizer_guard(optimizer) -- saves copy only what no optimizer owns."
        )

    pending: dict[int, torch.Tensor] = {}  # id -> a tensor to copy (not guarded by a known optimizer)

    def tensor(value: torch.Tensor) -> torch.Tensor:
        local = _local(value)
        if local.data_ptr() in owned or local.numel() == 0 or local.device.type == "meta":
            return value
        pending[id(value)] = value
        out.bytes_captured += local.numel() * local.element_size()
        return value

    def leaf(value: Any) -> Any:
        if type(value) in _PLAIN or isinstance(value, torch.Tensor):
            return tensor(value)
        if isinstance(value, _IMMUTABLE):
            return value
        try:
            copied = copy.deepcopy(value)
        except Exception as exc:  # noqa: BLE001 - an object deepcopy refuses is read live, as before
            logger.warning("dcp_datastates: cannot copy %s for the snapshot (%s); it is pickled later, live", type(value).__name__, exc)
            return value
        out.objects_copied += 1
        return copied

    def walk(value: Any) -> Any:
        if type(value) in _PLAIN:  # the common leaf first: no ABC isinstance checks
            return tensor(value)
        if type(value) is dict or isinstance(value, Mapping):
            values = list(value.values())
            if set(map(type, values)) <= _PLAIN_SET and owned.issuperset(map(_data_ptr, values)):
                return dict(value)  # a model's parameters, all guarded: shared as they are, at C speed
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list) and not _is_terminal(value):
            return [walk(v) for v in value]
        return leaf(value)

    try:
        out.state_dict = {k: walk(v) for k, v in state_dict.items()}
    finally:
        # ``walk`` refers to itself through its closure: without this, the cycle (and through ``tensor``,
        # ``out`` with every captured copy) lives until the garbage collector runs, keeping a capture
        # arena in use (see ``batch_copy``) for no reason.
        walk = None  # type: ignore[assignment]  # noqa: F841
    out.tensors_captured = len(pending)
    if out.bytes_captured > budget_bytes:
        # Too much is unguarded to copy aside (typically: no optimizer has stepped yet). The caller
        # stages synchronously instead: memory stays bounded by the pool, the state is still step N.
        out.over_budget = True
        out.tensors_captured = 0
        return out
    if pending:
        copies = _copy_pending(pending, to_host, out)
        out.private_ids = {id(c) for c in copies.values()}
        out.state_dict = _substitute(out.state_dict, copies)
    return out


def _copy_pending(pending: dict[int, torch.Tensor], to_host: bool, out: CapturedState) -> dict[int, torch.Tensor]:
    """Private copies of every pending tensor: plain dense ones in groups (``batch_copy``), the rest one by one."""
    grouped = [key for key, value in pending.items() if batchable(value)]
    copies = dict(zip(grouped, copy_tensors([pending[key] for key in grouped], to_host)))
    if to_host and any(pending[key].device.type == "cuda" for key in grouped):
        out.to_host = True
    for key, value in pending.items():
        if key not in copies:
            copies[key] = _copy(value, to_host, out)
    return copies


def _copy(value: torch.Tensor, to_host: bool, out: CapturedState) -> torch.Tensor:
    local = _local(value)
    with torch.no_grad():
        if local.device.type == "cpu":
            copied = local.detach().clone()
        elif to_host and not isinstance(value, DTensor):
            out.to_host = True
            copied = local.detach().to("cpu")
        else:
            copied = local.detach().clone()  # on the caller's current stream: ordered, no host sync
    if local.requires_grad:
        copied.requires_grad_(True)  # DCP records it in the metadata
    if isinstance(value, DTensor):
        copied = DTensor.from_local(
            copied, value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
        )
    return copied


def _substitute(value: Any, copies: dict[int, torch.Tensor]) -> Any:
    """``value`` (containers built by ``capture_mutable``, so ours to change) with each pending tensor replaced."""
    if type(value) is dict:
        if copies.keys().isdisjoint(map(id, value.values())):
            if all(type(v) in _PLAIN_SET for v in value.values()):
                return value
        for k, v in value.items():
            value[k] = _substitute(v, copies)
        return value
    if type(value) is list:
        for i, v in enumerate(value):
            value[i] = _substitute(v, copies)
        return value
    return copies.get(id(value), value)


def _is_terminal(value: list) -> bool:
    """DCP's rule (``_traverse.traverse_state_dict``): a list is a leaf unless it holds tensors or containers."""
    for entry in value:
        if isinstance(entry, torch.Tensor):
            return False
        if isinstance(entry, Mapping):
            return False
        if isinstance(entry, list) and not _is_terminal(entry):
            return False
    return True


def skeleton_of(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict with every tensor replaced by a meta tensor of the same shape, dtype and placement.

    This is what the staging future hands DCP: its planning reads shapes, dtypes and DTensor
    placements only, and our ``write_data`` never reads data from it. A PROCESS executor
    pickles it to its daemon without touching a byte of (CUDA) tensor memory -- no CUDA IPC,
    no CUDA context in the daemon. A tensor that cannot be described on the meta device
    (an exotic subclass) is handed over as it is.
    """

    def meta(value: torch.Tensor) -> torch.Tensor:
        try:
            if isinstance(value, DTensor):
                local = torch.empty_like(value._local_tensor, device="meta")
                return DTensor.from_local(
                    local, value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
                )
            if type(value) in _PLAIN_SET:
                return torch.empty_like(value, device="meta").requires_grad_(value.requires_grad)
        except Exception:  # noqa: BLE001 - see the docstring
            pass
        return value

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return meta(value)
        if isinstance(value, Mapping):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list) and not _is_terminal(value):
            return [walk(v) for v in value]
        return value

    return {k: walk(v) for k, v in state_dict.items()}
