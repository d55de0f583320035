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
    # the async run also drives a multi-level manager, in the same process (one start-up for both)
    extra = ["multilevel"] if async_mode == "async" else []
    proc = subprocess.run([sys.executable, str(DRIVER), str(tmp_path), async_mode, *extra], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "kept ['step-4', 'step-6']" in proc.stdout
    assert f"torchtitan {async_mode} OK: resumed at step 6" in proc.stdout
    if extra:  # multi-level: saved locally (keep 2), drained, the last step's shared copy deleted, resumed from local
        assert "local kept ['step-4', 'step-6']" in proc.stdout
        assert "torchtitan async multilevel OK: resumed at step 6" in proc.stdout


def test_multilevel_fields_are_validated():
    from dcp_datastates.integrations.torchtitan import DataStatesCheckpointManager

    config = DataStatesCheckpointManager.Config(datastates_local_dir="/nvme/{node}/ckpt", datastates_drain_every=3,
                                                datastates_drain_policy="skip")
    ml = config.datastates_config().multilevel
    assert (ml.local_dir, ml.drain_every, ml.drain_policy, ml.partners, ml.keep_local) == ("/nvme/{node}/ckpt", 3, "skip", 1, 2)
    assert DataStatesCheckpointManager.Config().datastates_config().multilevel is None
    with pytest.raises(ValueError, match="not 'async_with_pinned_mem'"):
        DataStatesCheckpointManager.Config(datastates_local_dir="/nvme/{node}", async_mode="async_with_pinned_mem")
    with pytest.raises(ValueError, match="absolute path"):
        DataStatesCheckpointManager.Config(datastates_local_dir="nvme/{node}")


def test_storage_backend_switch_is_validated():
    from dcp_datastates.integrations.torchtitan import DataStatesCheckpointManager

    with pytest.raises(ValueError, match="storage_backend must be 'datastates' or 'filesystem'"):
        DataStatesCheckpointManager.Config(storage_backend="s3")
    with pytest.raises(ValueError, match="host_pool_bytes"):
        DataStatesCheckpointManager.Config(datastates_host_pool_bytes="1MiB")
