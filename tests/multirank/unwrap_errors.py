"""Run under torchrun --nproc_per_node=2: a failure on rank 1 only reaches both ranks as our typed error.

    unwrap_errors.py OUT_DIR

Three entry points, each failing on rank 1 alone: ``dcp.save`` (rank 1's path is a file),
``async_save(...).upload_completion.result()`` (the same, in the upload thread) and ``dcp.load``
(rank 1 asks for a key the checkpoint lacks). Each rank prints one line per case.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from dcp_datastates import DataStatesLoadPlanner, DataStatesReader, DataStatesWriter, unwrap_errors

warnings.filterwarnings("ignore")
dist.init_process_group("gloo")
rank = dist.get_rank()
out = sys.argv[1]
not_a_directory = os.path.join(out, "a-file")
if rank == 0:
    with open(not_a_directory, "w") as f:
        f.write("not a checkpoint directory")
dist.barrier()
state = {"w": torch.arange(8.0) + rank}


def report(case: str, call) -> None:
    raw = None
    try:
        call("raw")
    except BaseException as exc:  # noqa: BLE001 - what DCP raises, before unwrapping
        raw = exc
    try:
        with unwrap_errors():
            call("unwrapped")
        line = {"case": case, "rank": rank, "error": None}
    except BaseException as exc:  # noqa: BLE001
        line = {
            "case": case, "rank": rank, "raw": type(raw).__name__, "raw_is_exception": isinstance(raw, Exception),
            "error": type(exc).__name__, "failed_rank": getattr(exc, "failed_rank", None),
            "failed_ranks": sorted(getattr(exc, "rank_failures", {})),
            "cause": type(exc.__cause__).__name__, "message": str(exc)[:200],
        }
    # one write (< PIPE_BUF, so atomic on the shared pipe): with PYTHONUNBUFFERED, print() writes the
    # text and its newline separately, and the other rank's line can land between them
    sys.stdout.write("RESULT " + json.dumps(line) + "\n")
    sys.stdout.flush()


# Each attempt saves into a directory of its own: the coordinator's directory lock, taken in its local
# plan, is released only when the writer is dropped (DCP tells a writer nothing of another rank's failure).
def save(attempt: str) -> None:
    path = not_a_directory if rank == 1 else os.path.join(out, f"save-{attempt}")
    dcp.save(state, storage_writer=DataStatesWriter(path, overwrite=True))


def async_upload(attempt: str) -> None:
    path = not_a_directory if rank == 1 else os.path.join(out, f"async-{attempt}")
    response = dcp.async_save(state, storage_writer=DataStatesWriter(path, overwrite=True), async_stager=DefaultStager(StagingOptions(False, False, False, False)))
    getattr(response, "upload_completion", response).result()  # the legacy Future with a non-async stager


dcp.save(state, storage_writer=DataStatesWriter(os.path.join(out, "good")))


def load(attempt: str) -> None:
    wanted = {"w": torch.zeros(8)} | ({"missing": torch.zeros(2)} if rank == 1 else {})
    dcp.load(wanted, storage_reader=DataStatesReader(os.path.join(out, "good")), planner=DataStatesLoadPlanner())


report("save", save)
report("async_upload", async_upload)
report("load", load)
assert issubclass(CheckpointException, BaseException) and not issubclass(CheckpointException, Exception)
dist.destroy_process_group()
