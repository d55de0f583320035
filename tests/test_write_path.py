"""The write path's promises: bounded host memory, objects pickled beside tensor writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections import OrderedDict

import torch
import torch.distributed.checkpoint as dcp

from conftest import small_config
from dcp_datastates import DataStatesReader, DataStatesSavePlanner, DataStatesWriter
from dcp_datastates.native.pwrite_engine import ThreadPoolWriteEngine
from dcp_datastates.native.uring_engine import IoUringWriteEngine


def test_peak_host_memory_stays_within_pool_plus_margin(tmp_path, engine):
    """Save a 256 MiB state through a 32 MiB pool in a fresh process and sample its RSS."""
    script = textwrap.dedent(
        f"""
        import os, threading, time, warnings, torch
        import torch.distributed.checkpoint as dcp
        from dcp_datastates import DataStatesConfig, DataStatesWriter
        warnings.filterwarnings("ignore")
        page = os.sysconf("SC_PAGE_SIZE")
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
        state = {{"model": {{f"w{{i}}": torch.randn(2**22) for i in range(16)}}, "step": 3}}  # 256 MiB
        config = DataStatesConfig(io_engine={engine!r}, chunk_bytes="4MiB", host_pool_bytes="32MiB")
        dcp.save(state, storage_writer=DataStatesWriter({str(tmp_path / "warm")!r}, config), no_dist=True)
        baseline, peak, done = rss(), 0, False
        def sample():
            global peak
            while not done:
                peak = max(peak, rss()); time.sleep(0.002)
        t = threading.Thread(target=sample); t.start()
        dcp.save(state, storage_writer=DataStatesWriter({str(tmp_path / "c")!r}, config), no_dist=True)
        done = True; t.join()
        print((peak - baseline) // 2**20)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth_mib = int(proc.stdout.split()[-1])
    # The pool is already allocated by the warm-up save; a second save may only add small
    # per-save structures, never anything proportional to the 256 MiB state.
    assert growth_mib <= 32, f"RSS grew by {growth_mib} MiB during a 256 MiB save with a 32 MiB pool"


#: How long one side of a forced interleaving waits for the other before the test fails (no hang).
RENDEZVOUS_S = 15.0


class PickledWhileTensorsStream:
    """An object whose pickling can only finish once a tensor write has been submitted.

    ``__reduce__`` announces that pickling began, then waits for the first tensor write to
    reach the engine; the engine, in turn, holds that first write until pickling began. So a
    save that pickles objects strictly before its tensors (nothing was submitted yet) or strictly
    after them (nobody pickles while the write waits) fails after ``RENDEZVOUS_S`` -- only a save
    that runs both at once gets through.
    """

    def __init__(self, pickling_began: threading.Event, tensor_write_submitted: threading.Event) -> None:
        self.pickling_began = pickling_began
        self.tensor_write_submitted = tensor_write_submitted
        self.pickled_on: list[str] = []

    def __reduce__(self):
        self.pickled_on.append(threading.current_thread().name)
        self.pickling_began.set()
        if not self.tensor_write_submitted.wait(RENDEZVOUS_S):
            raise RuntimeError("objects were pickled while no tensor write was submitted: they did not overlap")
        return (OrderedDict, ([("lr", 0.1), ("betas", (0.9, 0.95))],))  # loads under weights_only


class TensorThreadPlanner(DataStatesSavePlanner):
    """Notes the threads that resolve tensors (copy them out of the live state)."""

    def __init__(self) -> None:
        super().__init__()
        self.tensor_threads: set[str] = set()

    def resolve_data(self, write_item):
        if write_item.type.name != "BYTE_IO":
            self.tensor_threads.add(threading.current_thread().name)
        return super().resolve_data(write_item)


def test_objects_are_pickled_on_their_own_thread_while_tensors_stream(tmp_path, engine, monkeypatch):
    pickling_began, tensor_write_submitted = threading.Event(), threading.Event()
    submitted_to: list[str] = []

    def hold_first_tensor_write(real):
        def submit(self, request):
            if request.path.endswith("_0.distcp"):  # the tensor file (objects go to ``_1``)
                submitted_to.append(request.path)
                tensor_write_submitted.set()
                if not pickling_began.wait(RENDEZVOUS_S):
                    raise RuntimeError("a tensor write was submitted but nothing pickled meanwhile: no overlap")
            return real(self, request)

        return submit

    for cls in (ThreadPoolWriteEngine, IoUringWriteEngine):
        monkeypatch.setattr(cls, "submit", hold_first_tensor_write(cls.submit))
    blocker = PickledWhileTensorsStream(pickling_began, tensor_write_submitted)
    state = {f"w{i}": torch.randn(20_000) for i in range(40)} | {"step": 5, "optim_cfg": blocker}
    planner = TensorThreadPlanner()
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "c", small_config(engine)), planner=planner, no_dist=True)
    assert submitted_to and blocker.pickled_on  # both sides of the rendezvous really ran
    assert len(blocker.pickled_on) == 1 and not set(blocker.pickled_on) & planner.tensor_threads  # a thread of its own
    monkeypatch.undo()
    out = {f"w{i}": torch.zeros(20_000) for i in range(40)} | {"step": 0, "optim_cfg": None}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert out["step"] == 5 and out["optim_cfg"] == OrderedDict([("lr", 0.1), ("betas", (0.9, 0.95))])
    assert all(torch.equal(out[f"w{i}"], state[f"w{i}"]) for i in range(40))
