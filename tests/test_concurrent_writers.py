"""Two saves into one directory: the second is refused naming the first; nothing is lost (issue 16.6).

The first save is held mid-write with an event (threads) or by slowed writes and a
pipe (processes), so the overlap is certain, not a matter of timing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from conftest import N, assert_loads_as, small_config, state_of
from dcp_datastates import DataStatesWriter
from dcp_datastates import chunk_stream
from dcp_datastates.errors import CheckpointBusyError
from dcp_datastates.save_claim import LOCK_FILE



def hold_the_sealer(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Stop the first save's first buffer on its way to the engine until ``release`` is set."""
    reached, release = threading.Event(), threading.Event()
    real = chunk_stream.ChunkedFileStream._checksum_and_submit
    held_stream: list[object] = []

    def held(self, sealed):
        if not held_stream:
            held_stream.append(self)
        if held_stream[0] is self:  # later saves run freely: a broken lock must fail, not hang
            reached.set()
            release.wait(60)  # never raise here: the sealer must go on (a failing test releases late)
        return real(self, sealed)

    monkeypatch.setattr(chunk_stream.ChunkedFileStream, "_checksum_and_submit", held)
    return reached, release


@pytest.mark.parametrize("second", ["async_save", "save"])
def test_a_second_save_in_another_thread_is_refused_naming_the_first(tmp_path, engine, monkeypatch, second):
    path = tmp_path / "ckpt"
    dcp.save(state_of(1.0), storage_writer=DataStatesWriter(path, small_config(engine)), no_dist=True)
    reached, release = hold_the_sealer(monkeypatch)
    first_writer = DataStatesWriter(path, small_config(engine), overwrite=True)
    first = dcp.async_save(state_of(2.0), storage_writer=first_writer, no_dist=True)
    assert reached.wait(60)
    before = sorted(p.name for p in path.iterdir())

    results: list[BaseException | None] = []

    def second_save() -> None:  # another training thread (or a careless callback) saving here too
        try:
            # Its own pool (another geometry): were it let in, it would not wait for the held save's buffers.
            writer = DataStatesWriter(path, small_config(engine, host_pool_bytes=8 * 8192), overwrite=True)
            if second == "async_save":
                dcp.async_save(state_of(3.0), storage_writer=writer, no_dist=True).upload_completion.result()
            else:
                dcp.save(state_of(3.0), storage_writer=writer, no_dist=True)
            results.append(None)
        except BaseException as exc:  # noqa: BLE001
            results.append(exc)

    thread = threading.Thread(target=second_save)
    thread.start()
    thread.join(60)
    if results and results[0] is None:
        release.set()  # the mutation case: let the first save end before failing
    assert not thread.is_alive() and len(results) == 1 and results[0] is not None
    error = results[0]
    if second == "async_save":
        assert isinstance(error, CheckpointBusyError)  # raised in the caller, before any byte is copied
    else:
        assert isinstance(error, CheckpointException) and "CheckpointBusyError" in str(error)
    message = str(error)
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert first_writer._claim.lock.holder_id in message  # the first save's holder id ...
    assert first_writer.save_id[:8] not in message  # ... never its file-name tag (the names it creates)
    assert first_writer.save_id[:8] not in (path / LOCK_FILE).read_text()
    assert "this very process" in message
    assert sorted(p.name for p in path.iterdir()) == before  # the refused save wrote nothing

    release.set()
    first.upload_completion.result(timeout=120)
    assert_loads_as(path, 2.0)
    assert not (path / LOCK_FILE).exists()  # released with the commit
    monkeypatch.undo()
    # Once the first save is committed the directory is free again.
    dcp.save(state_of(3.0), storage_writer=DataStatesWriter(path, small_config(engine), overwrite=True), no_dist=True)
    assert_loads_as(path, 3.0)
    tags = {p.name.split("_")[3] for p in path.iterdir() if p.name.startswith("__")}
    assert len(tags) == 1  # only the last save's files: its commit removed the earlier ones


def test_a_failed_save_releases_the_directory(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"

    def boom(self, flat):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(chunk_stream.ChunkedFileStream, "write_tensor", boom)
    with pytest.raises(CheckpointException, match="injected"):
        dcp.save(state_of(1.0), storage_writer=DataStatesWriter(path, small_config("threads")), no_dist=True)
    response = dcp.async_save(state_of(1.0), storage_writer=DataStatesWriter(path, small_config("threads")), no_dist=True)
    with pytest.raises(Exception, match="injected"):
        response.upload_completion.result(timeout=60)
    monkeypatch.undo()
    assert not (path / LOCK_FILE).exists()
    dcp.save(state_of(1.0), storage_writer=DataStatesWriter(path, small_config("threads")), no_dist=True)
    assert_loads_as(path, 1.0)


HOLDER = textwrap.dedent(
    """
    import sys, time, warnings, torch
    import torch.distributed.checkpoint as dcp
    from dcp_datastates import DataStatesConfig, DataStatesWriter
    from dcp_datastates.native import pwrite_engine
    warnings.filterwarnings("ignore")
    path = sys.argv[1]
    config = DataStatesConfig(io_engine="threads", chunk_bytes=8192, host_pool_bytes=4 * 8192)
    real = pwrite_engine.write_fully
    gate = open(sys.argv[2])  # the parent writes a line to let the writes go on
    first = [True]
    def held(*a, **k):
        if first[0]:
            first[0] = False
            gate.readline()
        return real(*a, **k)
    pwrite_engine.write_fully = held
    state = {"a": torch.full((N,), 2.0), "b": torch.arange(N, dtype=torch.float64) + 2.0, "step": 2}
    writer = DataStatesWriter(path, config, overwrite=True)
    response = dcp.async_save(state, storage_writer=writer, no_dist=True)
    print(writer._claim.lock.holder_id, flush=True)
    response.upload_completion.result()
    print("committed", flush=True)
    """
).replace("(N,)", f"({N},)").replace("arange(N,", f"arange({N},")


def start_holder(path: Path, tmp_path: Path) -> tuple[subprocess.Popen, int, str]:
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(fifo)], stdout=subprocess.PIPE, text=True)
    gate = os.open(fifo, os.O_WRONLY)  # blocks until the child opened its end
    tag = proc.stdout.readline().strip()
    assert len(tag) == 12, tag
    return proc, gate, tag


def test_a_second_process_is_refused_naming_the_first(tmp_path):
    path = tmp_path / "ckpt"
    dcp.save(state_of(1.0), storage_writer=DataStatesWriter(path, small_config("threads")), no_dist=True)
    proc, gate, tag = start_holder(path, tmp_path)
    try:
        with pytest.raises(CheckpointBusyError) as excinfo:
            dcp.async_save(state_of(3.0), storage_writer=DataStatesWriter(path, small_config("threads"), overwrite=True), no_dist=True)
        message = str(excinfo.value)
        assert f"pid {proc.pid}" in message and tag in message and "this very process" not in message
        with pytest.raises(CheckpointException, match=f"(?s)CheckpointBusyError.*{tag}"):
            dcp.save(state_of(3.0), storage_writer=DataStatesWriter(path, small_config("threads"), overwrite=True), no_dist=True)
        os.write(gate, b"go\n")
        assert proc.stdout.readline().strip() == "committed"
        assert proc.wait(120) == 0
    finally:
        os.close(gate)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_loads_as(path, 2.0)


def test_a_sigkilled_save_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "ckpt"
    dcp.save(state_of(1.0), storage_writer=DataStatesWriter(path, small_config("threads")), no_dist=True)
    proc, gate, _ = start_holder(path, tmp_path)
    try:
        assert (path / LOCK_FILE).exists()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        os.close(gate)
    assert_loads_as(path, 1.0)  # the killed overwrite never committed
    dcp.save(state_of(3.0), storage_writer=DataStatesWriter(path, small_config("threads"), overwrite=True), no_dist=True)
    assert_loads_as(path, 3.0)
    assert not (path / LOCK_FILE).exists()
