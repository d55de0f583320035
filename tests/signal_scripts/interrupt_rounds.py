"""Interrupt saves at chosen moments, many rounds, one fork per round (driven by tests/test_interrupt_under_load.py).

Usage: ``python interrupt_rounds.py ROUNDS.json``. The driver imports torch and the package
once and never saves itself (no thread of ours exists when it forks), then forks a child per
round, up to ``parallel`` at a time. A child overwrites (or creates) a checkpoint with slowed
writes and tells the driver over a pipe when the save is under way ("go"); the driver waits
the round's delay and sends the round's signal. Children end as an interrupted program ends:
an uncaught ``KeyboardInterrupt`` through normal interpreter exit (which joins the save
threads), or death by SIGTERM. Each child's stderr goes to ``<round dir>/stderr.txt``.

An interpreter with torch loaded takes seconds of CPU to tear its modules down, which is no
part of what is tested: a child dies of SIGINT from its first ``atexit`` handler -- after the
interpreter has joined the save threads and run the exit hooks, where our cleanup must be
over, and before module teardown. Daemon threads are frozen there a little earlier than at a
full exit: stricter, never more lenient.
One JSON line per round on stdout: the round, the child's wait status, seconds from signal to exit.

No try/finally wraps the fork: a child's exception must unwind to the top level like a script's.
"""

import atexit
import json
import os
import select
import signal
import sys
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp

from dcp_datastates import DataStatesConfig, DataStatesWriter, unwrap_errors
from dcp_datastates import writer as writer_module
from dcp_datastates.native import pwrite_engine, uring_engine

warnings.filterwarnings("ignore")
spec = json.loads(open(sys.argv[1]).read())
N, WRITE_DELAY, TIMEOUT = spec["floats"], spec["write_delay"], spec["timeout"]


def state(value: float) -> dict:
    return {f"w{i}": torch.full((N,), value + i) for i in range(4)} | {"step": int(value)}


def slow_down_writes() -> None:
    real_write, real_submit = pwrite_engine.write_fully, uring_engine.IoUringWriteEngine.submit

    def slow_write(*args, **kwargs):
        time.sleep(WRITE_DELAY)
        return real_write(*args, **kwargs)

    def slow_submit(self, request):  # the ring writes on its own: slow down what feeds it
        time.sleep(WRITE_DELAY)
        return real_submit(self, request)

    pwrite_engine.write_fully = slow_write
    uring_engine.IoUringWriteEngine.submit = slow_submit


def die_of_sigint_if_interrupted() -> None:
    last = getattr(sys, "last_value", None)
    if isinstance(last, KeyboardInterrupt):
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


def child(round_: dict, tell) -> None:
    err = os.open(os.path.join(round_["dir"], "stderr.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 2)
    os.dup2(err, 1)
    slow_down_writes()
    atexit.register(die_of_sigint_if_interrupted)
    real_begin = writer_module.begin_save

    def begin_and_tell(*args, **kwargs):  # "go" once the save is registered: the signal lands in the save
        save = real_begin(*args, **kwargs)
        if round_["scenario"] != "commit":
            tell("go")
        return save

    writer_module.begin_save = begin_and_tell
    new_state = state(2.0)
    if round_.get("handler") == "own-raise":  # the program's own handler: ours stays out of the way
        def own(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, own)
    elif round_.get("handler") == "own-abandon":  # ... and one that abandons the saves itself, as documented
        from dcp_datastates import abandon_in_flight_saves

        def own(signum, frame):
            abandon_in_flight_saves("the program's SIGINT handler")
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, own)
    # no checksums: a fresh process would spend its first seconds loading the numba kernels
    config = DataStatesConfig(io_engine=round_["engine"], chunk_bytes=32768, host_pool_bytes=4 * 32768, checksums=False)
    target = os.path.join(round_["dir"], "step-1" if round_["target"] == "overwrite" else "step-2")
    writer = DataStatesWriter(target, config, overwrite=True)
    scenario = round_["scenario"]
    if scenario == "sync-staged":  # no optimizer known, more than the capture budget: stage() waits for the copies
        writer_module.CAPTURE_BUDGET_FLOOR = 0
    if scenario == "commit":  # hold the upload thread right before the commit until the signal has been handled
        real_commit = writer_module.commit_checkpoint

        def commit_after_the_signal(*args, **kwargs):
            tell("go")
            deadline = time.monotonic() + TIMEOUT
            while writer._interrupt is not None and writer._interrupt.reason is None and time.monotonic() < deadline:
                time.sleep(0.005)
            return real_commit(*args, **kwargs)

        writer_module.commit_checkpoint = commit_after_the_signal
    if scenario == "sync":
        with unwrap_errors():
            dcp.save(new_state, storage_writer=writer, no_dist=True)
    else:
        response = dcp.async_save(new_state, storage_writer=writer, no_dist=True)
        if round_.get("wait") == "future":
            response.upload_completion.result()  # the signal lands while the program waits for the save
    time.sleep(TIMEOUT)  # "training" until the signal arrives
    raise SystemExit(99)  # not interrupted: the round failed


# pid -> [round, pipe, when to signal (None: not told "go" yet), signalled at]
running: dict[int, list] = {}
pending = list(spec["rounds"])
while pending or running:
    while pending and len(running) < spec["parallel"]:
        round_ = pending.pop(0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            child(round_, lambda word: os.write(write_end, word.encode() + b"\n"))
        os.close(write_end)
        running[pid] = [round_, read_end, None, None]
    waiting = [entry[1] for entry in running.values() if entry[2] is None]
    ready, _, _ = select.select(waiting, [], [], 0.01)
    now = time.monotonic()
    for pid, entry in list(running.items()):
        round_, fd, signal_at, signalled = entry
        if signal_at is None and fd in ready and os.read(fd, 64):
            entry[2] = signal_at = now + round_["delay"]
        if signal_at is not None and signalled is None and now >= signal_at:
            os.kill(pid, getattr(signal, round_["signal"]))
            entry[3] = signalled = now
        elif signalled is not None and now - signalled > TIMEOUT:
            os.kill(pid, signal.SIGKILL)  # hung: reported by its exit status (-9)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            os.close(fd)
            del running[pid]
            seconds = None if signalled is None else time.monotonic() - signalled
            print(json.dumps({"round": round_, "exit": os.waitstatus_to_exitcode(status), "seconds": seconds}), flush=True)
