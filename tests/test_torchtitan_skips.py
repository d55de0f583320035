"""Without torchtitan, the torchtitan tests skip, saying why, instead of failing (issue 17.3).

``tests/torchtitan_scripts/without_torchtitan.py`` runs pytest with torchtitan hidden and a stray
``torchtitan`` folder on ``sys.path`` (the namespace-package trap that ``importorskip`` falls into).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HIDE = TESTS / "torchtitan_scripts" / "without_torchtitan.py"
TORCHTITAN_TESTS = ["test_torchtitan.py", "test_torchtitan_example.py"]


def run_hidden(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HIDE), "-q", "-rs", "-p", "no:cacheprovider", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def test_torchtitan_tests_skip_with_a_reason_when_torchtitan_is_absent():
    proc = run_hidden(*(str(TESTS / name) for name in TORCHTITAN_TESTS), cwd=TESTS.parent)
    out = proc.stdout + proc.stderr
    # pytest's exit code 5: no test ran -- every module skipped itself at collection, none errored.
    assert proc.returncode == 5, out[-4000:]
    assert "torchtitan hidden" in out
    assert f"{len(TORCHTITAN_TESTS)} skipped" in out and "failed" not in out and "error" not in out.lower(), out[-4000:]
    assert out.count("torchtitan is not installed") == len(TORCHTITAN_TESTS), out[-4000:]


def test_the_hidden_environment_reproduces_the_namespace_package_trap(tmp_path):
    """Control: with torchtitan hidden, the old ``importorskip("torchtitan")`` does not skip."""
    (tmp_path / "test_old_guard.py").write_text(
        "import pytest\n"
        "pytest.importorskip('torchtitan')\n"
        "from torchtitan.components.checkpointer.dcp import CheckpointManager\n"
        "def test_x():\n    pass\n"
    )
    proc = run_hidden(str(tmp_path / "test_old_guard.py"), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ModuleNotFoundError" in out and "skipped" not in out, out[-4000:]
