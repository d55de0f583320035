"""examples/torchtitan_datastates.py: torchtitan's own --module/--config parsing builds our manager.

This is the README's torchtitan command up to the point where torchtitan's trainer needs a GPU:
``python -m torchtitan.train --module torchtitan_datastates --config llama3_debugmodel_datastates``
with examples/ on PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "torchtitan_scripts" / "parse_example_config.py"


def _installed(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None  # a stray folder (namespace package) is not the package


if not _installed("torchtitan"):
    pytest.skip(
        "torchtitan is not installed (the test extra installs torchtitan==0.3.0 on Python >= 3.11: "
        'pip install -e ".[test]")',
        allow_module_level=True,
    )
if not _installed("triton"):
    pytest.skip(
        "torchtitan 0.3.0's trainer (and so its config registry) imports triton, which is not installed "
        '(the test extra installs it on Linux x86_64; CUDA builds of torch bring it too)',
        allow_module_level=True,
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "examples"), env.get("PYTHONPATH")]))
    return env


def test_torchtitan_config_parsing_builds_the_datastates_manager_from_the_example(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    checks = {c["check"]: c for c in map(json.loads, filter(None, proc.stdout.splitlines()))}

    parsed = checks["parsed"]
    assert parsed["is_ours"], parsed
    assert (parsed["enable"], parsed["interval"], parsed["async_mode"], parsed["storage_backend"]) == (
        True, 5, "async", "datastates")
    assert (parsed["pool"], parsed["chunk"], parsed["engine"]) == ("8MiB", "1MiB", "threads")
    assert parsed["last_save_model_only"] is False and parsed["stock_last_save_model_only"] is False
    assert parsed["same_training"] and parsed["same_model"]

    built = checks["built"]
    assert built["manager_type"] == "DataStatesCheckpointManager" and built["use_datastates"] is True
    cfg = built["writer_config"]
    assert (cfg["io_engine"], cfg["chunk_bytes"], cfg["host_pool_bytes"]) == ("threads", 1 << 20, 8 << 20), cfg
    assert ".metadata" in built["files"] and any(f.endswith("checksums.json") for f in built["files"]), built["files"]
    assert built["loaded"] is True and built["model_exact"] and built["optimizer_exact"], built

    helper = checks["with_datastates"]
    assert helper["unknown"].startswith("TypeError: with_datastates() got unknown checkpoint fields ['datastates_pool']")
    assert helper["bad_value"].startswith("ValidationError") and "chunk_bytes" in helper["bad_value"], helper
    assert helper["kept"] == [10, False, "filesystem", "threads"]  # llama3_debugmodel's interval and policy, our fields

    assert "chunk_bytes must be a multiple of 4096" in checks["bad_chunk"]["error"], checks["bad_chunk"]
    assert checks["bad_chunk"]["error"].startswith("exit 2")
    # Why the example module is needed: torchtitan's stock llama3 registry has no such flag.
    assert "Unrecognized options: --checkpoint.storage_backend" in checks["stock_module"]["error"], checks["stock_module"]


def test_torchtitan_train_help_lists_the_datastates_flags(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torchtitan.train", "--module", "torchtitan_datastates",
         "--config", "llama3_debugmodel_datastates", "--help"],
        capture_output=True, text=True, timeout=300, env=_env() | {"COLUMNS": "200"}, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = proc.stdout.replace("-", "_")  # tyro prints --checkpoint.storage-backend; both spellings parse
    for flag in ("__checkpoint.storage_backend {datastates,filesystem}", "__checkpoint.datastates_host_pool_bytes",
                 "__checkpoint.datastates_chunk_bytes", "__checkpoint.datastates_io_engine {auto,io_uring,threads}"):
        assert flag in text, f"{flag} missing from --help"
