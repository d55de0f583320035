"""The arguments of the ``dcp.async_save`` call that is staging through us, read at call time.

``dcp.async_save`` calls ``AsyncStager.stage(state_dict)`` with the state dict alone: the
``checkpoint_id`` and ``process_group`` it was given reach the storage writer only later,
on the upload thread, after staging has begun writing files. Two decisions cannot wait
that long -- *where* the snapshot's files go (``checkpoint_id`` wins over the writer's
path, as in ``dcp.save``; moving files afterwards would be a cross-device rename) and
*which ranks* save together (``replicas``) -- so ``stage`` reads them from the caller's
frame: the frame of torch's own ``async_save`` (matched by code object, never by name).
If torch changes so that the frame is not found, ``stage`` falls back to safe choices
(the writer's path, verified later by ``reset``; no item skipped as another rank's).
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint.state_dict_saver as _saver

ASYNC_SAVE_CODE = _ASYNC_SAVE_CODE = inspect.unwrap(_saver.async_save).__code__
_MAX_DEPTH = 12  # stage <- stage_state_dict <- logger wrapper(s) <- async_save


@dataclass(frozen=True)
class AsyncSaveCall:
    checkpoint_id: str | os.PathLike | None
    process_group: "dist.ProcessGroup | None"
    no_dist: bool


def find_async_save_call(stager: Any) -> AsyncSaveCall | None:
    """The ``dcp.async_save`` call whose stager is ``stager`` and that is running ``stager.stage``, if any."""
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return None
        if frame.f_code is _ASYNC_SAVE_CODE:
            local = frame.f_locals
            if local.get("async_stager") is not stager and local.get("storage_writer") is not stager:
                return None
            return AsyncSaveCall(local.get("checkpoint_id"), local.get("process_group"), bool(local.get("no_dist")))
    return None
