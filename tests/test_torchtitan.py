"""torchtitan's own CheckpointManager, switched to DataStates by config, in each of its async modes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


def torchtitan_installed() -> bool:
    """True only for a real torchtitan: a stray folder named ``torchtitan`` on ``sys.path``
    imports as a namespace package (no origin), which is not torchtitan."""
    spec = importlib.util.find_spec("torchtitan")
    return spec is not None and spec.origin is not None


if not torchtitan_installed():
    pytest.skip(
        "torchtitan is not installed (the test extra installs torchtitan==0.3.0 on Python >= 3.11: "
        'pip install -e ".[test]")',
        allow_module_level=True,
    )

DRIVER = Path(__file__).parent / "torchtitan_scripts" / "drive_checkpoint_manager.py"


@pytest.mark.parametrize("async_mode", ["disabled", "async", "async_with_pinned_mem"])
def test_torchtitan_checkpoint_manager_saves_and_resumes_through_datastates(tmp_path, async_mode):
    proc = subprocess.run([sys.executable, str(DRIVER), str(tmp_path), async_mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "kept ['step-4', 'step-6']" in proc.stdout
    assert f"torchtitan {async_mode} OK: resumed at step 6" in proc.stdout


def test_storage_backend_switch_is_validated():
    from dcp_datastates.integrations.torchtitan import DataStatesCheckpointManager

    with pytest.raises(ValueError, match="storage_backend must be 'datastates' or 'filesystem'"):
        DataStatesCheckpointManager.Config(storage_backend="s3")
    with pytest.raises(ValueError, match="host_pool_bytes"):
        DataStatesCheckpointManager.Config(datastates_host_pool_bytes="1MiB")
