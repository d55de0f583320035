"""The one-call GPU proof cannot rot between GPU runs: its driver runs here on CPU, tiny, through the same code.

The documented CPU command runs once, as ``.ci/gpu quick`` starts the driver (a subprocess), every
phase for real; the time boxes are proven with phases that hang. Each document is validated
against the driver's own schema (``gpu_proof.ProofDocument``, which the driver builds it with).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from dcp_datastates import gpu_proof
from dcp_datastates.gpu_proof import (
    BenchFigures, GoalCheck, MethodFigures, PhaseRecord, ProofDocument, Row, GpuTestFigures, TrainFigures,
)
from dcp_datastates.gpu_proof_phases import gpu_test_files

REPO = Path(__file__).resolve().parent.parent


def run_driver(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[ProofDocument, Path, str]:
    """``python -m dcp_datastates.gpu_proof --device cpu --tiny --out DIR`` as ``.ci/gpu quick`` starts it."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dcp_datastates.gpu_proof", "--device", "cpu", "--tiny", "--out", str(out),
           "--dir", str(tmp_path), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    document = ProofDocument.model_validate_json((out / gpu_proof.DOCUMENT).read_text())
    return document, out, done.stdout + done.stderr


def phase(document: ProofDocument, name: str) -> PhaseRecord:
    return next(p for p in document.phases if p.name == name)


def test_cpu_run_of_every_phase_fills_the_schema_with_real_figures(tmp_path):
    from conftest import io_uring_blocked

    document, out, output = run_driver(tmp_path)
    assert document.finished and document.all_ok, output[-3000:]
    env = document.environment
    assert env.device == "cpu" and env.tiny and env.torch and env.cpu_cores >= 1 and env.disk_free_gib > 0

    tests = phase(document, "tests").figures
    assert isinstance(tests, GpuTestFigures) and tests.exit_code == 0
    assert "tests/test_gpu.py" in tests.files and tests.collected == len(tests.outcomes) >= 11
    assert set(tests.outcomes.values()) <= {"passed", "skipped"}  # skipped here: no CUDA device

    bench = phase(document, "bench").figures
    assert isinstance(bench, BenchFigures) and bench.rounds == 1 and bench.cold_page_cache is not None
    assert bench.pool_bytes >= bench.state_bytes and bench.pool_pinned is False  # the auto pool holds the state
    methods = {r.method: r for r in bench.rows}
    assert set(methods) == {"pinned device-to-host copy", "pageable device-to-host copy", "raw O_DIRECT write (ceiling)",
                            *gpu_proof.STOCK_SAVES, "DataStatesWriter io_uring", "DataStatesWriter threads",
                            "raw O_DIRECT read, QD 8 (ceiling)", gpu_proof.STOCK_LOAD, gpu_proof.OURS_LOAD}
    for row in bench.rows:
        if row.method == "DataStatesWriter io_uring" and io_uring_blocked() is not None:
            assert row.error and "io_uring" in row.error
            continue
        runs = 3 if row.kind == "copy" else 1
        assert row.error is None and len(row.seconds) == runs and row.gib_per_s and row.gib_per_s > 0, row
    for engine in ("io_uring", "threads"):
        stats = methods[f"DataStatesWriter {engine}"].stats
        if stats:  # our writer copied every tensor byte, on CPU with no device copy
            assert stats["engine"] == engine and stats["device_copies"] == 0 and stats["copy_seconds"] > 0
            assert stats["tensor_bytes"] >= bench.state_bytes
    for name in (gpu_proof.STOCK_LOAD, gpu_proof.OURS_LOAD):
        assert methods[name].stats["exact"] is True  # every load compared with the saved state
    assert methods[gpu_proof.OURS_LOAD].stats["framed"] == bench.tensors  # straight into the destinations

    train = phase(document, "train").figures
    assert isinstance(train, TrainFigures) and train.skipped == [] and train.plan is not None
    assert [m.method for m in train.methods] == ["none", "DataStatesWriter async", "stock async_save + DefaultStager",
                                                 "stock FileSystemWriter"]
    for method in train.methods:
        assert len(method.steps_seconds) == 1 and method.steps_seconds[0] > 0
        assert len(method.stalls_s) == (0 if method.method == "none" else train.steps // train.every)

    goals = {g.name: g for g in document.goals}
    assert set(goals) == {"gpu_tests_pass", "d2h_at_80pct_of_pinned", "save_io_uring_at_least_stock",
                          "save_threads_at_least_stock", "load_1_5x_stock", "stall_below_stock_async",
                          "stall_under_100ms", "overhead_at_most_5pct"}
    assert not any(g.at_scale for g in goals.values())  # a CPU smoke run proves the code, not the figures
    for name in ("load_1_5x_stock", "stall_under_100ms", "overhead_at_most_5pct", "save_threads_at_least_stock"):
        assert isinstance(goals[name].passed, bool) and goals[name].value is not None, goals[name]
    assert goals["gpu_tests_pass"].passed is False  # every gpu test skipped here: said, not hidden
    assert sorted(p.name for p in out.iterdir()) == ["bench.log", "gpu_proof.json", "tests.log", "train.log"]


def test_hung_phases_are_killed_at_their_boxes_and_keep_what_they_published(tmp_path, monkeypatch):
    """Both phases hang (ignoring SIGTERM, a child in their group): each is killed at its box, the second still runs."""
    monkeypatch.setenv(gpu_proof.HANG_ENV, "bench,train")
    out = tmp_path / "out"
    code = gpu_proof.main(["--device", "cpu", "--tiny", "--out", str(out), "--dir", str(tmp_path), "--phases", "bench,train",
                           "--box", "bench=2", "--box", "train=2", "--kill-grace-s", "0.5"])
    document = ProofDocument.model_validate_json((out / gpu_proof.DOCUMENT).read_text())
    assert code == 1 and document.finished and not document.all_ok  # a timeout is never "all ok"
    for name, kind in (("bench", BenchFigures), ("train", TrainFigures)):
        hung = phase(document, name)
        assert hung.status == "timeout" and hung.reason == "killed at its 2 s box", hung
        assert 2 <= hung.seconds < 2 + 0.5 + 15, hung.seconds  # box, grace, and a loaded machine's slack
        assert isinstance(hung.figures, kind)  # what it published before it hung
        grandchild = int(re.search(r"grandchild pid (\d+)", hung.log_tail).group(1))  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while Path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # reaped by init once killed
        assert not Path(f"/proc/{grandchild}").exists(), f"a process of the hung {name} phase's group survived"
    assert isinstance(phase(document, "bench").figures, BenchFigures) and phase(document, "bench").figures.skipped == ["hung on purpose"]
    assert phase(document, "tests").status == "skipped"
    assert sorted(p.name for p in out.iterdir()) == ["bench.log", "gpu_proof.json", "train.log"]


def test_gpu_tests_are_found_by_their_marker():
    names = {p.name for p in gpu_test_files(REPO / "tests")}
    assert {"test_gpu.py", "test_lazy_snapshot.py", "test_read_path.py", "test_save_threads.py"} <= names
    assert "test_gpu_proof.py" not in names and "test_roundtrip.py" not in names


def test_goals_compare_the_numbers_they_name():
    bench = BenchFigures(device="cuda", torch="2.11", state_bytes=4 * gpu_proof.GiB, tensors=1, rows=[
        Row(method="pinned device-to-host copy", kind="copy", bytes=gpu_proof.GiB, seconds=[0.02]),  # 50 GiB/s
        Row(method="stock FileSystemWriter", kind="save", bytes=4 * gpu_proof.GiB, seconds=[8.0]),  # 0.5 GiB/s
        Row(method="stock async_save + pinned DefaultStager", kind="save", bytes=4 * gpu_proof.GiB, seconds=[4.0]),
        Row(method="DataStatesWriter threads", kind="save", bytes=4 * gpu_proof.GiB, seconds=[2.0, 3.0, 5.0],
            stats={"tensor_bytes": 4 * gpu_proof.GiB, "copy_seconds": 0.08}),  # median 3 s: 1.33 GiB/s; copies 50 GiB/s
        Row(method="stock FileSystemReader", kind="load", bytes=4 * gpu_proof.GiB, seconds=[4.0]),
        Row(method="DataStatesReader", kind="load", bytes=4 * gpu_proof.GiB, seconds=[3.0]),
    ])
    train = TrainFigures(device="cuda", torch="2.11", params=1_040_000_000, dtype="bf16", state_bytes=1, steps=20, every=5,
                         dim=1, layers=1, heads=1, vocab=1, seq=1, batch=1, methods=[
                             MethodFigures(method="none", steps_seconds=[100.0]),
                             MethodFigures(method="DataStatesWriter async", steps_seconds=[104.0], stalls_s=[0.02, 0.12]),
                             MethodFigures(method="stock async_save + DefaultStager", steps_seconds=[130.0], stalls_s=[2.0])])
    phases = [PhaseRecord(name="bench", status="ok", figures=bench), PhaseRecord(name="train", status="ok", figures=train)]
    goals: dict[str, GoalCheck] = {g.name: g for g in gpu_proof.evaluate_goals(phases, "cuda")}
    assert goals["d2h_at_80pct_of_pinned"].passed is True and goals["d2h_at_80pct_of_pinned"].value == pytest.approx(50)
    assert goals["d2h_at_80pct_of_pinned"].limit == pytest.approx(40)  # 80% of 50 GiB/s
    assert goals["save_threads_at_least_stock"].passed is True and goals["save_threads_at_least_stock"].limit == 1.0
    assert goals["save_io_uring_at_least_stock"].passed is None  # not measured: said, not guessed
    assert goals["load_1_5x_stock"].passed is False and goals["load_1_5x_stock"].limit == pytest.approx(1.5)
    assert goals["stall_below_stock_async"].passed is True and goals["stall_under_100ms"].passed is False
    assert goals["overhead_at_most_5pct"].passed is True and goals["overhead_at_most_5pct"].value == pytest.approx(0.04)
    assert all(g.at_scale for g in goals.values())


def test_a_phase_gets_its_box_less_what_the_later_phases_need_at_least():
    order = ["tests", "bench", "train"]
    nominal, minimum = gpu_proof.phase_boxes(order, "cuda", {})
    assert gpu_proof.box_for(0, order, 390, nominal, minimum) == nominal["tests"]
    assert gpu_proof.box_for(0, order, 150, nominal, minimum) == 150 - minimum["bench"] - minimum["train"]
    assert gpu_proof.box_for(2, order, 250, nominal, minimum) == 250  # the last phase gets what is left


def test_the_gpu_image_gets_every_dependency_the_proof_imports():
    """Each runtime dependency, and each of pydantic's needs, is in the image or fetched (``.ci/gpu fetch``)."""
    from importlib.metadata import requires

    script = (REPO / ".ci" / "gpu").read_text()
    names = lambda var: {w.split("==")[0].lower().replace("_", "-")  # noqa: E731
                         for w in re.search(rf"^{var}=\(([^)]*)\)", script, re.M | re.S).group(1).split()}  # type: ignore[union-attr]
    available = names("IMAGE_HAS") | names("WHEEL_PINS") | {re.search(r"^LIBURING=(\S+)==", script, re.M).group(1)}  # type: ignore[union-attr]
    wanted = set()
    for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        wanted.add(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower())  # type: ignore[union-attr]
    for requirement in requires("pydantic") or []:
        if "extra ==" not in requirement:
            wanted.add(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-"))  # type: ignore[union-attr]
    assert wanted - available == set()


def test_the_driver_names_the_training_methods_the_benchmark_has():
    from dcp_datastates import bench_training

    assert gpu_proof.TRAIN_METHOD_KEYS == tuple(bench_training.METHOD_KEYS)
    assert (gpu_proof.TRAIN_NONE, gpu_proof.TRAIN_OURS, gpu_proof.TRAIN_STOCK_ASYNC) == tuple(bench_training.METHODS[:3])
