"""Fault injection: killed ranks, full disks, I/O errors, damaged files, back-to-back saves, concurrency.

Every case asserts that nothing is lost: the previous checkpoint loads bit for bit, a
failed save never looks complete, and the process (the "training") can go on.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from conftest import io_uring_blocked, small_config
from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter, IncompleteCheckpointError
from dcp_datastates.buffer_pool import HostBufferPool
from dcp_datastates.commit import METADATA_FILE
from dcp_datastates.native import pwrite_engine, uring_engine
from dcp_datastates.resume import latest_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def state_of(n: int, value: float) -> dict:
    return {f"w{i}": torch.full((n,), value + i) for i in range(4)} | {"step": int(value)}


def load_state(path: Path, n: int) -> dict:
    out = {f"w{i}": torch.zeros(n) for i in range(4)} | {"step": 0}
    dcp.load(out, storage_reader=DataStatesReader(path), no_dist=True)
    return out


def assert_loads_as(path: Path, n: int, value: float) -> None:
    out = load_state(path, n)
    assert out["step"] == int(value)
    for i in range(4):
        assert torch.equal(out[f"w{i}"], torch.full((n,), value + i))


def no_partial_files(path: Path) -> bool:
    return not path.exists() or not any(p.name.endswith((".distcp", "checksums.json")) for p in path.iterdir())


# -- a process killed mid-save ---------------------------------------------------------------------
def test_sigkill_during_a_save_loses_nothing(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time, warnings, torch
        import torch.distributed.checkpoint as dcp
        from dcp_datastates import DataStatesConfig, DataStatesWriter
        from dcp_datastates.native import pwrite_engine
        warnings.filterwarnings("ignore")
        config = DataStatesConfig(io_engine="threads", chunk_bytes=8192, host_pool_bytes=4 * 8192)
        state = {{f"w{{i}}": torch.full((50_000,), 7.0 + i) for i in range(4)}} | {{"step": 7}}
        dcp.save(state, storage_writer=DataStatesWriter("{tmp_path}/step-7", config), no_dist=True)
        real = pwrite_engine.write_fully
        def slow(*a, **k):
            time.sleep(0.05)
            return real(*a, **k)
        pwrite_engine.write_fully = slow
        print("saving step-8", flush=True)
        dcp.save(state, storage_writer=DataStatesWriter("{tmp_path}/step-8", config), no_dist=True)
        print("finished", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving step-8"
    deadline = time.time() + 60
    while not any(p.suffix == ".distcp" for p in (tmp_path / "step-8").glob("*")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # well inside the ~10 s the slowed save takes
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "step-8" / METADATA_FILE).exists()
    with pytest.raises(IncompleteCheckpointError, match="not a complete checkpoint"):
        DataStatesReader(tmp_path / "step-8").read_metadata()
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "step-7"
    assert_loads_as(tmp_path / "step-7", 50_000, 7.0)
    dcp.save(state_of(50_000, 9.0), storage_writer=DataStatesWriter(tmp_path / "step-9", small_config("io_uring")), no_dist=True)
    assert_loads_as(tmp_path / "step-9", 50_000, 9.0)
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "step-9"


# -- the disk fills up -----------------------------------------------------------------------------
def namespace_for_a_private_mount() -> list[str] | None:
    """An ``unshare`` prefix under which this user may mount a tmpfs, or None.

    A user namespace (``-Ur``) lets an unprivileged user mount in its own mount namespace;
    root needs only the mount namespace. The mount lives and dies with the child process,
    so a crashed test leaves nothing mounted on the machine.
    """
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return prefix
    return None


def test_real_enospc_on_a_full_filesystem(tmp_path):
    """A save that fills a real 1 MiB tmpfs fails with the kernel's ENOSPC and harms nothing.

    Runs in a child process in a private mount namespace (no root needed where user
    namespaces are allowed). Where neither kind of namespace may be created, it skips:
    ``test_injected_enospc_fails_the_future_and_training_goes_on`` then covers the same
    error path with an injected ENOSPC.
    """
    prefix = namespace_for_a_private_mount()
    if prefix is None:
        pytest.skip("cannot create a mount namespace here (unshare refused); the injected ENOSPC test covers this path")
    engines = ["threads"] + (["io_uring"] if io_uring_blocked() is None else [])  # one child process for both
    script = textwrap.dedent(
        f"""
        import os, subprocess, warnings, torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter
        from dcp_datastates.buffer_pool import HostBufferPool
        warnings.filterwarnings("ignore")
        tiny = {str(tmp_path / "tiny")!r}
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", tiny], check=True)
        for engine in {engines!r}:
            config = DataStatesConfig(io_engine=engine, chunk_bytes=8192, host_pool_bytes=4 * 8192)
            pool = HostBufferPool.shared(8192, 4, torch.cuda.is_available())
            small = {{"w": torch.arange(1000.0), "step": 1}}
            dcp.save(small, storage_writer=DataStatesWriter(f"{{tiny}}/ok-{{engine}}", config), no_dist=True)
            big = {{"w": torch.randn(2**20)}}  # 4 MiB on a 1 MiB file system
            response = dcp.async_save(big, storage_writer=DataStatesWriter(f"{{tiny}}/full-{{engine}}", config), no_dist=True)
            try:
                response.upload_completion.result()
                raise SystemExit(f"{{engine}}: a 4 MiB save fitted on a 1 MiB file system")
            except (CheckpointException, OSError) as exc:
                assert "No space left on device" in str(exc), exc
            assert pool.in_use == 0  # every staging buffer came back
            left = os.listdir(f"{{tiny}}/full-{{engine}}")
            assert not any(n.endswith((".distcp", "checksums.json", ".metadata")) for n in left), left
            out = {{"w": torch.zeros(1000), "step": 0}}
            dcp.load(out, storage_reader=DataStatesReader(f"{{tiny}}/ok-{{engine}}"), no_dist=True)
            assert torch.equal(out["w"], torch.arange(1000.0)) and out["step"] == 1
            print(f"{{engine}}: ENOSPC handled", flush=True)
        """
    )
    (tmp_path / "tiny").mkdir()
    proc = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.split("\n")[:-1] == [f"{engine}: ENOSPC handled" for engine in engines], proc.stdout


@pytest.mark.parametrize("engine", ["threads", "io_uring"])
def test_injected_enospc_fails_the_future_and_training_goes_on(tmp_path, engine, monkeypatch):
    config = small_config(engine)
    pool = HostBufferPool.shared(config.chunk_bytes, config.pool_buffers, torch.cuda.is_available())
    dcp.save(state_of(5000, 1.0), storage_writer=DataStatesWriter(tmp_path / "prev", config), no_dist=True)
    calls = {"n": 0}

    def after_three_writes(result: int) -> int:
        calls["n"] += 1
        return -errno.ENOSPC if calls["n"] > 3 else result

    if engine == "threads":
        real = pwrite_engine.write_fully

        def failing(fd, path, buffer, offset):
            if after_three_writes(0) < 0:
                raise OSError(errno.ENOSPC, "No space left on device", path)
            return real(fd, path, buffer, offset)

        monkeypatch.setattr(pwrite_engine, "write_fully", failing)
    else:
        real_complete = uring_engine.IoUringWriteEngine._complete
        monkeypatch.setattr(
            uring_engine.IoUringWriteEngine, "_complete", lambda self, ud, res: real_complete(self, ud, after_three_writes(res))
        )
    model = torch.nn.Linear(4, 4)
    response = dcp.async_save(state_of(5000, 2.0), storage_writer=DataStatesWriter(tmp_path / "new", config), no_dist=True)
    model(torch.randn(2, 4)).sum().backward()  # training goes on meanwhile
    with pytest.raises((CheckpointException, OSError), match=r"(?s)No space left on device.*__0_\w+_0\.distcp"):
        response.upload_completion.result()
    assert pool.in_use == 0
    assert no_partial_files(tmp_path / "new") and not (tmp_path / "new" / METADATA_FILE).exists()
    monkeypatch.undo()
    assert_loads_as(tmp_path / "prev", 5000, 1.0)
    dcp.save(state_of(5000, 3.0), storage_writer=DataStatesWriter(tmp_path / "retry", config), no_dist=True)
    assert_loads_as(tmp_path / "retry", 5000, 3.0)


# -- I/O errors from io_uring ----------------------------------------------------------------------
def tamper_uring(monkeypatch, tamper) -> None:
    real = uring_engine.IoUringWriteEngine._complete
    monkeypatch.setattr(uring_engine.IoUringWriteEngine, "_complete", lambda self, ud, res: real(self, ud, tamper(self, ud, res)))


def test_io_uring_short_writes_are_completed(tmp_path, monkeypatch):
    seen = set()

    def short_once(engine, user_data, result):
        if user_data not in seen and result > 4096:
            seen.add(user_data)
            return 4096  # the kernel wrote one page only
        return result

    tamper_uring(monkeypatch, short_once)
    dcp.save(state_of(20_000, 4.0), storage_writer=DataStatesWriter(tmp_path / "c", small_config("io_uring")), no_dist=True)
    assert len(seen) >= 5
    monkeypatch.undo()
    assert_loads_as(tmp_path / "c", 20_000, 4.0)
    assert subprocess.run([sys.executable, "-m", "dcp_datastates", "verify", str(tmp_path / "c"), "--no-progress"]).returncode == 0


def test_io_uring_transient_errors_are_retried(tmp_path, monkeypatch):
    failed = set()

    def eagain_once(engine, user_data, result):
        if user_data not in failed:
            failed.add(user_data)
            return -errno.EAGAIN
        return result

    tamper_uring(monkeypatch, eagain_once)
    dcp.save(state_of(20_000, 5.0), storage_writer=DataStatesWriter(tmp_path / "c", small_config("io_uring")), no_dist=True)
    monkeypatch.undo()
    assert len(failed) >= 5
    assert_loads_as(tmp_path / "c", 20_000, 5.0)


def test_io_uring_eio_is_surfaced_naming_the_file(tmp_path, monkeypatch):
    dcp.save(state_of(20_000, 6.0), storage_writer=DataStatesWriter(tmp_path / "c", small_config("io_uring")), no_dist=True)
    count = {"n": 0}

    def eio_on_fifth(engine, user_data, result):
        count["n"] += 1
        return -errno.EIO if count["n"] == 5 else result

    tamper_uring(monkeypatch, eio_on_fifth)
    with pytest.raises(CheckpointException, match=r"(?s)Input/output error \(io_uring write of \d+ bytes to \S+__0_\w+_0\.distcp at offset \d+\)"):
        dcp.save(state_of(20_000, 7.0), storage_writer=DataStatesWriter(tmp_path / "c", small_config("io_uring"), overwrite=True), no_dist=True)
    monkeypatch.undo()
    assert_loads_as(tmp_path / "c", 20_000, 6.0)  # the overwrite failed; the old checkpoint is whole


# -- damaged checkpoints ---------------------------------------------------------------------------
def test_metadata_from_a_different_checkpoint_is_named(tmp_path):
    dcp.save(state_of(100, 1.0), storage_writer=DataStatesWriter(tmp_path / "a"), no_dist=True)
    dcp.save(state_of(100, 2.0), storage_writer=DataStatesWriter(tmp_path / "b"), no_dist=True)
    (tmp_path / "b" / METADATA_FILE).write_bytes((tmp_path / "a" / METADATA_FILE).read_bytes())
    with pytest.raises(CheckpointException, match="(?s)does not belong to the data files.*copied from another checkpoint"):
        load_state(tmp_path / "b", 100)


@pytest.mark.parametrize("kind, suffix", [("tensor", "_0.distcp"), ("object", "_1.distcp")])
def test_missing_data_file_is_named(tmp_path, kind, suffix):
    """Each of a rank's data files (tensors ``_0``, objects ``_1``), when missing, is named by the load error."""
    dcp.save(state_of(100, 1.0), storage_writer=DataStatesWriter(tmp_path / "c"), no_dist=True)
    files = sorted(p.name for p in (tmp_path / "c").iterdir() if p.suffix == ".distcp")
    assert [name[-len("_0.distcp"):] for name in files] == ["_0.distcp", "_1.distcp"]  # both kinds exist to lose
    (victim,) = [p for p in (tmp_path / "c").iterdir() if p.name.endswith(suffix)]
    victim.unlink()
    with pytest.raises(CheckpointException, match=rf"(?s)data file '{victim.name}' of checkpoint .* is missing") as caught:
        load_state(tmp_path / "c", 100)
    (survivor,) = [name for name in files if name != victim.name]
    assert f"'{survivor}'" not in str(caught.value), f"the error blames the {kind} file's intact sibling too"


# -- back-to-back saves and concurrency --------------------------------------------------------------
def test_ten_back_to_back_async_saves_stay_within_the_pool(tmp_path):
    """Ten async saves of a state 4-16x the 64 MiB pool, issued at once: host memory stays bounded.

    The state is 1 GiB where the disk has room for ten of them in flight at once (all ten
    may be partly written before the first is removed), and shrinks to what fits -- never
    below 256 MiB, 4x the pool, where the test would stop proving that saves stream.
    """
    free = shutil.disk_usage(tmp_path).free
    tensor_elems = min(2**24, (free // 2 // 10) // (16 * 4))  # 16 float32 tensors per save, half the free space
    if tensor_elems * 16 * 4 < 256 * 2**20:
        pytest.skip(f"needs ~5 GiB of free temp disk for ten 256 MiB saves in flight; {free / 2**30:.1f} GiB free")
    script = textwrap.dedent(
        f"""
        import os, shutil, threading, time, warnings, torch
        import torch.distributed.checkpoint as dcp
        from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter
        warnings.filterwarnings("ignore")
        page = os.sysconf("SC_PAGE_SIZE")
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
        state = {{"model": {{f"w{{i}}": torch.full(({tensor_elems},), float(i)) for i in range(16)}}, "step": 0}}  # up to 1 GiB
        config = DataStatesConfig(chunk_bytes="8MiB", host_pool_bytes="64MiB")
        # Warm-up with a tiny pool: loads the libraries (numba kernels, io_uring binding) once,
        # so the measurement below sees the 64 MiB pool and per-save costs only.
        tiny = DataStatesConfig(chunk_bytes="64KiB", host_pool_bytes="128KiB")
        dcp.save({{"x": torch.ones(10), "s": 1}}, storage_writer=DataStatesWriter("{tmp_path}/warm", tiny), no_dist=True)
        baseline, peak, done = rss(), 0, False
        def sample():
            global peak
            while not done:
                peak = max(peak, rss()); time.sleep(0.005)
        sampler = threading.Thread(target=sample, daemon=True); sampler.start()
        responses = []
        try:
            for k in range(10):
                responses.append(dcp.async_save(state, storage_writer=DataStatesWriter("{tmp_path}/c%d" % k, config), no_dist=True))
            for k, r in enumerate(responses):
                r.upload_completion.result()
                if k < 9:
                    shutil.rmtree("{tmp_path}/c%d" % k)
        finally:
            done = True
        sampler.join()
        out = {{"model": {{f"w{{i}}": torch.zeros({tensor_elems}) for i in range(16)}}, "step": -1}}
        dcp.load(out, storage_reader=DataStatesReader("{tmp_path}/c9"), no_dist=True)
        assert all(torch.equal(out["model"][f"w{{i}}"], state["model"][f"w{{i}}"]) for i in range(16))
        print((peak - baseline) // 2**20)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth_mib = int(proc.stdout.split()[-1])
    state_mib = tensor_elems * 16 * 4 // 2**20
    assert growth_mib <= 64 + 64, f"host memory grew {growth_mib} MiB over ten {state_mib} MiB saves with a 64 MiB pool"


def test_concurrent_readers_do_not_interfere_with_a_save(tmp_path, engine):
    dcp.save(state_of(30_000, 1.0), storage_writer=DataStatesWriter(tmp_path / "read_me", small_config(engine)), no_dist=True)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                assert_loads_as(tmp_path / "read_me", 30_000, 1.0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for k in range(3):
        dcp.save(state_of(30_000, 10.0 + k), storage_writer=DataStatesWriter(tmp_path / f"w{k}", small_config(engine)), no_dist=True)
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    for k in range(3):
        assert_loads_as(tmp_path / f"w{k}", 30_000, 10.0 + k)


def test_failed_async_save_then_success_reuses_the_same_writer_config(tmp_path):
    config = DataStatesConfig(io_engine="threads", chunk_bytes=8192, host_pool_bytes=4 * 8192)
    (tmp_path / "blocker").write_text("a file where the checkpoint directory should go")
    with pytest.raises(Exception, match="is a file, not a directory"):
        dcp.async_save(state_of(10, 1.0), storage_writer=DataStatesWriter(tmp_path / "blocker", config), no_dist=True)
    response = dcp.async_save(state_of(10, 2.0), storage_writer=DataStatesWriter(tmp_path / "ok", config), no_dist=True)
    response.upload_completion.result()
    assert_loads_as(tmp_path / "ok", 10, 2.0)
    assert os.path.isfile(tmp_path / "blocker")
