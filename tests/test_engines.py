"""The io_uring and pwrite engines: identical bytes, exact lengths, GIL-free waits, clear failures."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import ENGINES, io_uring_blocked, io_uring_not_expected
from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter
from dcp_datastates.buffer_pool import HostBufferPool
from dcp_datastates.chunk_stream import ChunkedFileStream
from dcp_datastates.native import EngineUnavailable, WriteRequest, create_engine, open_for_write
from dcp_datastates.native.pwrite_engine import ThreadPoolWriteEngine
from dcp_datastates.native.uring_engine import IoUringWriteEngine


def stream_bytes(path: str, engine_name: str, pieces: list[bytes], direct: bool = True) -> int:
    engine = create_engine(engine_name, io_threads=3, queue_depth=4)
    pool = HostBufferPool(4096 * 2, 3, pin=False)
    try:
        stream = ChunkedFileStream(open_for_write(path, direct), engine, pool)
        for piece in pieces:
            stream.write_bytes(piece)
        return stream.close(fsync=True)
    finally:
        engine.close()


@pytest.mark.parametrize("total", [0, 1, 4095, 4096, 8191, 8192, 8193, 3 * 8192 + 17, 100_003])
def test_engines_write_identical_exact_files(tmp_path, total):
    payload = os.urandom(total)
    pieces = [payload[i : i + 777] for i in range(0, total, 777)]
    for name in ENGINES:
        size = stream_bytes(str(tmp_path / name), name, pieces)
        assert size == total
        assert (tmp_path / name).read_bytes() == payload  # no padding garbage, exact length


def test_buffered_fallback_where_o_direct_is_refused(tmp_path, monkeypatch, caplog):
    """File systems without O_DIRECT (older tmpfs, some FUSE) answer EINVAL at open."""
    real_open = os.open

    def refuse_direct(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refuse_direct)
    payload = os.urandom(10_000)
    with caplog.at_level(logging.INFO, logger="dcp_datastates"):
        opened = open_for_write(str(tmp_path / "probe"), direct=True)
        os.close(opened.fd)
        size = stream_bytes(str(tmp_path / "f"), "io_uring", [payload])
    assert not opened.direct and "refuses O_DIRECT" in caplog.text
    assert size == 10_000 and (tmp_path / "f").read_bytes() == payload


@pytest.mark.parametrize("name", ENGINES)
def test_write_error_names_the_file(tmp_path, name):
    engine = create_engine(name, io_threads=2, queue_depth=2)
    read_only = os.open(tmp_path / "ro.bin", os.O_RDONLY | os.O_CREAT, 0o644)
    done = threading.Event()
    errors: list[BaseException | None] = []

    def on_done(error):
        errors.append(error)
        done.set()

    try:
        engine.submit(WriteRequest(read_only, str(tmp_path / "ro.bin"), memoryview(bytearray(4096)), 0, on_done))
        assert done.wait(10)
    finally:
        engine.close()
        os.close(read_only)
    (error,) = errors
    assert isinstance(error, OSError) and error.errno == 9  # EBADF: fd not open for writing
    assert "ro.bin" in str(error) and "offset 0" in str(error)


def test_auto_falls_back_to_threads_when_io_uring_is_blocked(monkeypatch, caplog):
    import liburing

    def blocked(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")  # what kernel.io_uring_disabled=2 gives

    monkeypatch.setattr(liburing, "io_uring_queue_init", blocked)
    with caplog.at_level(logging.WARNING, logger="dcp_datastates"):
        engine = create_engine("auto", io_threads=2, queue_depth=4)
    try:
        assert engine.name == "threads"
        assert "io_uring unavailable" in caplog.text and "Operation not permitted" in caplog.text
    finally:
        engine.close()
    with pytest.raises(EngineUnavailable, match="io_engine='io_uring' was asked for"):
        create_engine("io_uring", io_threads=2, queue_depth=4)


def test_auto_picks_io_uring_where_it_works():
    if io_uring_blocked() is not None:
        pytest.skip(f"io_uring is blocked on this machine: {io_uring_blocked()}")
    engine = create_engine("auto", io_threads=2, queue_depth=4)
    try:
        assert engine.name == "io_uring"
    finally:
        engine.close()


@pytest.mark.parametrize("name", ENGINES)
def test_training_thread_keeps_running_during_a_large_save(tmp_path, name):
    """A save in a background thread (as async_save runs it) must not starve a Python training loop."""
    config = DataStatesConfig(io_engine=name, chunk_bytes="4MiB", host_pool_bytes="16MiB")
    state = {f"w{i}": torch.randn(8 * 2**20 // 4) for i in range(24)}  # 192 MiB

    def spin(seconds: float) -> int:
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            count += 1
        return count

    baseline_rate = spin(0.3) / 0.3
    saver = threading.Thread(
        target=dcp.save, args=(state,), kwargs={"storage_writer": DataStatesWriter(tmp_path / "c", config), "no_dist": True}
    )
    start = time.perf_counter()
    saver.start()
    counts = []
    while saver.is_alive():
        counts.append(spin(0.05))
    saver.join()
    elapsed = time.perf_counter() - start
    rate = sum(counts) / elapsed
    # Two Python threads share the GIL: the trainer should get a fair share, not a few percent.
    print(f"{name}: training loop at {rate / baseline_rate:.0%} of solo speed during a {elapsed:.2f}s save")
    assert rate > 0.25 * baseline_rate, f"training loop ran at {rate / baseline_rate:.0%} of its solo speed"


def test_io_uring_is_available_where_the_kernel_allows_it(tmp_path):
    """Where nothing legitimate blocks io_uring, it must work: CI cannot skip every io_uring test."""
    why_not = io_uring_not_expected()
    if why_not is not None:
        pytest.skip(f"io_uring may be unavailable here: {why_not}")
    assert io_uring_blocked() is None, f"io_uring should work on this machine but does not: {io_uring_blocked()}"
    size = stream_bytes(str(tmp_path / "f"), "io_uring", [b"\x5a" * 5000])
    assert size == 5000 and (tmp_path / "f").read_bytes() == b"\x5a" * 5000


_RECORD_PACKAGE_WRITES = """
import os, sys
from importlib.util import find_spec
package = os.path.dirname(find_spec("liburing").origin)
writes = []
def hook(event, args):
    if event == "open" and args[0] and str(args[0]).startswith(package) and (args[2] or 0) & (os.O_WRONLY | os.O_RDWR):
        writes.append(("open", str(args[0])))
    elif event in ("os.remove", "os.mkdir", "os.rename") and str(args[0]).startswith(package):
        writes.append((event, str(args[0])))
sys.addaudithook(hook)
from dcp_datastates.native.uring_ring import io_uring_problem
print(io_uring_problem(), writes)
"""


def _io_uring_or_skip() -> None:
    why_not = io_uring_not_expected() or io_uring_blocked()
    if why_not is not None:
        pytest.skip(f"io_uring unavailable here: {why_not}")


def test_importing_the_binding_writes_nothing_into_the_installed_package():
    """The binding's loader rewrites a cache file in its package on every import; ours must not."""
    import subprocess
    import sys

    _io_uring_or_skip()
    out = subprocess.run([sys.executable, "-c", _RECORD_PACKAGE_WRITES], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "None []", out.stdout + out.stderr


def test_io_uring_works_from_a_read_only_install(tmp_path):
    """A read-only site-packages (container image, shared software tree): io_uring still loads, and saves."""
    import shutil
    import subprocess
    import sys
    from importlib.util import find_spec

    _io_uring_or_skip()
    package = os.path.dirname(find_spec("liburing").origin)
    save = (f"import torch, torch.distributed.checkpoint as dcp; from dcp_datastates import DataStatesConfig, "
            f"DataStatesWriter; dcp.save({{'w': torch.arange(4096.0)}}, no_dist=True, storage_writer="
            f"DataStatesWriter({str(tmp_path / 'c')!r}, DataStatesConfig(io_engine='io_uring'))); print('SAVED')")
    script = (f"mount --bind {package} {package} && mount -o remount,ro,bind {package} || exit 3; echo MOUNTED; "
              f"test -w {package} && echo WRITABLE; exec {sys.executable} -c \"$0\"")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount the package read-only")
    proc = subprocess.run(["unshare", "-m", "bash", "-c", script, save], capture_output=True, text=True, timeout=180)
    if "MOUNTED" not in proc.stdout:
        pytest.skip(f"cannot mount read-only here (needs root in a mount namespace): {proc.stderr.strip()[:200]}")
    assert proc.stdout.split() == ["MOUNTED", "SAVED"], proc.stdout + proc.stderr  # no WRITABLE
    loaded = {"w": torch.zeros(4096)}
    dcp.load(loaded, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert torch.equal(loaded["w"], torch.arange(4096.0))


def test_ranks_importing_the_binding_at_once_all_get_io_uring():
    """Eight processes (as eight ranks of a node) probing io_uring at the same moment all get it.

    Left to itself, the binding's loader rewrites a cache file inside the installed package on
    each import, and about one process in fifty saw it vanish and lost io_uring (an ``auto``
    writer quietly on threads, an ``io_uring`` one refused).
    """
    import subprocess
    import sys

    _io_uring_or_skip()
    # each process imports our package, then waits for the common start time to import the binding
    probe = ("import sys, time; from dcp_datastates.native.uring_ring import io_uring_problem; "
             "time.sleep(max(0.0, float(sys.argv[1]) - time.time())); print(io_uring_problem())")
    outcomes = []
    for _ in range(8):
        start = str(time.time() + 1.5)
        procs = [subprocess.Popen([sys.executable, "-c", probe, start], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(8)]
        outcomes += [proc.communicate(timeout=120)[0].strip() for proc in procs]
    failed = [out for out in outcomes if out != "None"]
    assert not failed, f"{len(failed)} of {len(outcomes)} processes lost io_uring: {failed[0]}"


def test_binding_imports_take_turns_only_where_the_loader_would_write(monkeypatch):
    """The cross-process lock is a fallback: on a shared software tree it can span every node of a job."""
    import contextlib

    from dcp_datastates.native import uring_ring

    _io_uring_or_skip()
    entered = []

    @contextlib.contextmanager
    def recording_lock():
        entered.append(1)
        yield

    monkeypatch.setattr(uring_ring, "_one_process_at_a_time", recording_lock)
    assert uring_ring._import_binding().io_uring is not None and entered == []  # the loader's writes are off
    monkeypatch.setattr(uring_ring, "_LOADER_CACHE_STEPS", ("exists", "a_step_this_loader_lacks"))
    assert uring_ring._import_binding().io_uring is not None and entered == [1]  # unknown loader: take turns


def test_the_fallback_lock_is_exclusive_across_processes():
    import subprocess
    import sys
    from importlib.util import find_spec

    from dcp_datastates.native.uring_ring import _one_process_at_a_time

    _io_uring_or_skip()
    try_lock = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('FREE')\n"
                "except BlockingIOError: print('HELD')")
    origin = find_spec("liburing").origin

    def other_process() -> str:
        return subprocess.run([sys.executable, "-c", try_lock, origin], capture_output=True, text=True,
                              timeout=60).stdout.strip()

    with _one_process_at_a_time():
        assert other_process() == "HELD"
    assert other_process() == "FREE"


def test_a_failed_binding_import_is_raised_again_not_retried(monkeypatch):
    """A retried ``import liburing`` after a failed one gives an empty module; the first cause is what users see."""
    from dcp_datastates.native import uring_ring

    calls = []

    def failing_import():
        calls.append(1)
        raise FileNotFoundError(2, "No such file or directory", "__init__.importer-311.pyc")

    monkeypatch.setattr(uring_ring, "_binding", None)
    monkeypatch.setattr(uring_ring, "_binding_failure", None)
    monkeypatch.setattr(uring_ring, "_import_binding", failing_import)
    depths = []
    for _ in range(3):
        with pytest.raises(EngineUnavailable, match=r"cannot be imported \(\[Errno 2\].*importer-311") as caught:
            create_engine("io_uring", io_threads=1, queue_depth=2)
        cause, depth = caught.value.__cause__.__traceback__, 0
        while cause is not None:
            cause, depth = cause.tb_next, depth + 1
        depths.append(depth)
    assert calls == [1]
    assert depths[1] == depths[2]  # raised again with a fresh traceback, not one that grows each time


def test_the_fallback_goes_on_unlocked_where_the_file_system_refuses_flock(monkeypatch):
    """NFS refuses an exclusive flock on a read-only descriptor (EBADF), Lustre without flock (ENOSYS)."""
    import errno

    from dcp_datastates.native import uring_ring

    _io_uring_or_skip()

    def refused(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(uring_ring.fcntl, "flock", refused)
    monkeypatch.setattr(uring_ring, "_LOADER_CACHE_STEPS", ("exists", "a_step_this_loader_lacks"))
    assert uring_ring._import_binding().io_uring_queue_init is not None


def fd_flags(fd: int) -> int:
    """The open flags the kernel holds for ``fd`` (octal ``flags:`` line of /proc/self/fdinfo)."""
    for line in open(f"/proc/self/fdinfo/{fd}"):
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags line in /proc/self/fdinfo/{fd}")


def o_direct_refused_by(directory) -> str | None:
    probe = os.path.join(directory, ".o_direct_probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as exc:
        return f"{directory} refuses O_DIRECT ({exc.strerror})"
    finally:
        if os.path.exists(probe):
            os.unlink(probe)
    return None


@pytest.mark.skipif(not hasattr(os, "O_DIRECT") or not os.path.isdir("/proc/self/fdinfo"), reason="needs Linux O_DIRECT and /proc")
@pytest.mark.parametrize("name", ENGINES)
def test_data_file_is_written_through_o_direct_and_io_uring_reaps_every_byte(tmp_path, name, monkeypatch):
    """Asserted from the kernel's side, not from a log line: a build that quietly drops O_DIRECT or the ring fails."""
    refused = o_direct_refused_by(tmp_path)
    if refused is not None:
        pytest.skip(refused)
    import liburing

    writes: list[tuple[str, int, int]] = []  # (file the fd really is, its open flags, bytes) per write, at submission

    def watched(real):
        def submit(self, request):
            writes.append((os.readlink(f"/proc/self/fd/{request.fd}"), fd_flags(request.fd), len(request.buffer)))
            return real(self, request)

        return submit

    for cls in (ThreadPoolWriteEngine, IoUringWriteEngine):
        monkeypatch.setattr(cls, "submit", watched(cls.submit))
    reaped: list[int] = []  # results of the completions taken off an io_uring completion queue
    real_seen = liburing.io_uring_cqe_seen

    def seen(ring, cqe):
        if cqe.user_data != 0:  # 0: the engine's own wake-up, not a write
            reaped.append(cqe.res)
        return real_seen(ring, cqe)

    monkeypatch.setattr(liburing, "io_uring_cqe_seen", seen)
    state = {f"w{i}": torch.randn(30_000) for i in range(4)}
    writer = DataStatesWriter(tmp_path / "c", DataStatesConfig(io_engine=name, chunk_bytes="64KiB", host_pool_bytes="256KiB"))
    dcp.save(state, storage_writer=writer, no_dist=True)
    monkeypatch.undo()

    stats = writer.last_stats
    assert stats.engine == name
    data = [w for w in writes if w[0].endswith("_0.distcp")]
    assert data and sum(n for *_, n in data) >= stats.tensor_bytes
    assert all(flags & os.O_DIRECT for _, flags, _ in data), [oct(f) for _, f, _ in data]
    if name == "io_uring":
        assert len(reaped) >= len(data) and all(res > 0 for res in reaped)
        assert sum(reaped) >= stats.tensor_bytes  # every byte went through the ring, none around it
    else:
        assert reaped == []
    out = {k: torch.zeros(30_000) for k in state}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)
    assert all(torch.equal(out[k], v) for k, v in state.items())
