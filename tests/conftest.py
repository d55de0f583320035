"""Shared fixtures: every save-path test runs against both write engines."""

from __future__ import annotations

import functools
import platform
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dcp_datastates import DataStatesConfig, DataStatesWriter
from dcp_datastates.native import EngineUnavailable, create_engine

# Single-process DCP calls warn that torch.distributed is not initialized; that is the point here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

ENGINES = ["threads", "io_uring"]


@functools.cache
def io_uring_blocked() -> str | None:
    """Why an io_uring engine cannot be created in this process, or None where it can."""
    try:
        engine = create_engine("io_uring", io_threads=1, queue_depth=2)
    except EngineUnavailable as exc:
        return str(exc)
    engine.close()
    return None


def io_uring_not_expected() -> str | None:
    """Why this machine may legitimately lack io_uring, or None where it must work.

    io_uring should work on Linux >= 5.6 (IORING_OP_WRITE) with ``kernel.io_uring_disabled``
    0 (or absent: older kernels have no switch) and no seccomp filter (container runtimes'
    default profiles block the io_uring syscalls). Where all of that holds, a blocked ring
    is a broken install or a regression, and ``test_io_uring_is_available_where_the_kernel_allows_it``
    fails instead of letting every io_uring test skip.
    """
    if sys.platform != "linux":
        return f"not Linux ({sys.platform})"
    release = tuple(int(part) for part in platform.release().split("-")[0].split(".")[:2])
    if release < (5, 6):
        return f"kernel {platform.release()} predates IORING_OP_WRITE (5.6)"
    switch = Path("/proc/sys/kernel/io_uring_disabled")
    if switch.exists() and switch.read_text().strip() != "0":
        return f"kernel.io_uring_disabled={switch.read_text().strip()}"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Seccomp:") and line.split()[1] != "0":
            return f"a seccomp filter is installed (Seccomp: {line.split()[1]}), which may block io_uring"
    return None


def _blames_io_uring(exc: BaseException | None) -> bool:
    """Whether a test failed because the io_uring engine could not be created."""
    seen: set[int] = set()
    if isinstance(exc, AssertionError):  # a test's own verdict, e.g. "io_uring should work here"
        return False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, EngineUnavailable) or "io_uring cannot be used here" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests skip, saying why: ``@pytest.mark.gpu`` without a CUDA device; io_uring ones where it is blocked."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run `python -m pytest -m gpu` on a GPU machine)")
        for item in items:
            # The marker, not ``item.keywords``: keywords hold every parent node's name too, so a
            # checkout in a directory named ``gpu`` would skip the whole suite.
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)
    blocked = io_uring_blocked()
    if blocked is not None:
        skip = pytest.mark.skip(reason=f"io_uring is blocked on this machine: {blocked}")
        for item in items:
            params = getattr(item, "callspec", None)
            if "io_uring" in item.keywords or (params is not None and "io_uring" in params.params.values()):
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A test that uses io_uring along the way (not as a parameter) skips where io_uring is blocked.

    Only when the probe says io_uring cannot be created here *and* the failure is that very
    error; ``test_io_uring_is_available_where_the_kernel_allows_it`` keeps this from hiding a
    regression on machines where io_uring should work.
    """
    outcome = yield
    report = outcome.get_result()
    blocked = io_uring_blocked()
    if item.name == "test_io_uring_is_available_where_the_kernel_allows_it":
        return
    if report.failed and call.excinfo is not None and blocked is not None and _blames_io_uring(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: io_uring is blocked on this machine: {blocked}")


def small_config(engine: str, **overrides: object) -> DataStatesConfig:
    """Tiny chunks so that even small test states cross many buffer boundaries."""
    fields = {"io_engine": engine, "chunk_bytes": 8192, "host_pool_bytes": 4 * 8192} | overrides
    return DataStatesConfig(**fields)


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_writer(engine: str):
    def _make(path: Path | str, overwrite: bool = True, **overrides: object) -> DataStatesWriter:
        return DataStatesWriter(path, small_config(engine, **overrides), overwrite=overwrite)

    return _make


def sample_state() -> dict:
    """Tensors of every kind the issue names, plus non-tensor training state."""
    g = torch.Generator().manual_seed(1234)
    model = torch.nn.Linear(7, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    return {
        "f32": torch.randn(33, 17, generator=g),
        "bf16": torch.randn(129, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (5, 3, 2), generator=g),
        "scalar": torch.tensor(2.718281828),
        "empty": torch.empty(0, 4),
        "flags": torch.rand(11, generator=g) > 0.5,
        "transposed": torch.randn(6, 9, generator=g).t(),  # non-contiguous
        "big": torch.randn(40_000, generator=g),  # crosses several 8 KiB staging buffers
        "step": 42,
        "nested": {"name": "run-7", "lrs": [0.1, 0.05], "inner": {"t": torch.arange(6)}},
        "scheduler": scheduler.state_dict(),
    }


def zeros_like_state(state: dict, blank: object = None) -> dict:
    """A destination with the same structure, every tensor zeroed and every object set to ``blank``.

    Pass a ``blank`` that the state cannot contain when its objects may be ``None``: a load that
    delivered nothing must not compare equal.
    """
    out: dict = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.zeros_like(value.contiguous())
        elif isinstance(value, dict):
            out[key] = zeros_like_state(value, blank)
        else:
            out[key] = blank
    return out


def assert_state_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[key].dtype == value.dtype, key
            assert actual[key].shape == value.shape, key
            assert torch.equal(actual[key], value), key
        elif isinstance(value, dict):
            assert_state_equal(actual[key], value)
        else:
            assert actual[key] == value, key


# -- one state whose every value says which save it came from (saves racing, failing, overwriting)
N = 20_000


def state_of(value: float) -> dict:
    return {"a": torch.full((N,), value), "b": torch.arange(N, dtype=torch.float64) + value, "step": int(value)}


def assert_loads_as(path: Path, value: float) -> None:
    """``path`` loads exactly as the save of ``state_of(value)``."""
    import torch.distributed.checkpoint as dcp

    from dcp_datastates import DataStatesReader

    out = {"a": torch.zeros(N), "b": torch.zeros(N, dtype=torch.float64), "step": 0}
    dcp.load(out, storage_reader=DataStatesReader(path), no_dist=True)
    assert out["step"] == int(value)
    assert torch.equal(out["a"], torch.full((N,), value))
    assert torch.equal(out["b"], torch.arange(N, dtype=torch.float64) + value)


MULTIRANK = Path(__file__).parent / "multirank"


#: What a rank prints when gloo's C++ worker threads are torn down at interpreter exit while still holding
#: work (a torch/gloo teardown race, seen rarely on a loaded machine after the script's last line ran).
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun_script(script: str, *args: str, timeout: int = 300, nproc: int = 2, rerun_teardown_abort: bool = False) -> str:
    """Run ``tests/multirank/<script>`` on ``nproc`` gloo ranks; fail with every rank's output, return stdout.

    ``rerun_teardown_abort``: for scripts that only read (running them twice is the same as once),
    run once more when a rank died of :data:`GLOO_TEARDOWN_ABORT` -- never for any other failure.
    """
    import os
    import subprocess
    import sys
    import warnings

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(MULTIRANK))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(MULTIRANK / script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and rerun_teardown_abort and GLOO_TEARDOWN_ABORT in proc.stderr and "SIGABRT" in proc.stderr:
        warnings.warn(f"{script}: a rank aborted in gloo's teardown at exit; running it once more")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def plant(path: Path, kind: str, outside: Path) -> None:
    """Put an entry of ``kind`` at ``path`` (a link to, or a hard link of, ``outside``; a FIFO, directory or file)."""
    import os

    if kind == "symlink":
        path.symlink_to(outside)
    elif kind == "dangling":
        path.symlink_to(outside.parent / "does-not-exist")
    elif kind == "hardlink":
        os.link(outside, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"planted")
