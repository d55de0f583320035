"""The CLI's edges (issue 15.5): --version, wording, --json everywhere, exit codes as documented."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

import dcp_datastates
from conftest import small_config
from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter
from dcp_datastates.cli import EXIT_DAMAGED, EXIT_OK, EXIT_UNUSABLE, EXIT_UNVERIFIED
from dcp_datastates.cli import main as cli_main


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


def save(path: Path, state: dict, config: DataStatesConfig | None = None) -> Path:
    dcp.save(state, storage_writer=DataStatesWriter(path, config or small_config("threads")), no_dist=True)
    return path


def test_exit_codes_are_the_documented_ones():
    assert (EXIT_OK, EXIT_DAMAGED, EXIT_UNUSABLE, EXIT_UNVERIFIED) == (0, 1, 2, 3)
    doc = dcp_datastates.cli.__doc__
    for line in ("0  success", "1  the checkpoint is damaged", "2  usage error", "3  nothing wrong found, but unverified"):
        assert line in doc


def test_version_comes_from_the_package_metadata():
    expected = importlib.metadata.version("dcp-datastates")
    assert dcp_datastates.__version__ == expected
    done = subprocess.run([sys.executable, "-m", "dcp_datastates", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"dcp-datastates {expected}"


def test_one_rank_is_singular_and_counts_are_exact(tmp_path):
    ckpt = save(tmp_path / "c", {"w": torch.ones(3), "step": 1})
    code, out, _ = cli("inspect", str(ckpt))
    assert code == 0
    assert out.rstrip().endswith("total: 2 keys (1 tensor, 1 object), 12 B of tensors, 2 data files, 1 rank")


def test_convert_json_and_a_missing_output_directory(tmp_path):
    ckpt = save(tmp_path / "c", {"w": torch.arange(5.0), "step": 3})
    code, out, _ = cli("convert", str(ckpt), str(tmp_path / "out.pt"), "--to", "torch", "--json")
    report = json.loads(out)
    assert code == 0 and report == {"ok": True, "path": str(ckpt), "out": str(tmp_path / "out.pt"), "format": "torch",
                                     "bytes": (tmp_path / "out.pt").stat().st_size}
    assert torch.load(tmp_path / "out.pt", weights_only=True)["step"] == 3
    code, out, err = cli("convert", str(ckpt), str(tmp_path / "no" / "such" / "out.pt"), "--to", "torch")
    assert code == EXIT_UNUSABLE and out == ""
    assert err == f"error: cannot write '{tmp_path / 'no' / 'such' / 'out.pt'}': directory '{tmp_path / 'no' / 'such'}' does not exist; create it first\n"
    code, out, _ = cli("convert", str(ckpt), str(tmp_path / "no" / "out.pt"), "--to", "torch", "--json")
    assert code == EXIT_UNUSABLE and json.loads(out)["error"] == "CheckpointPathError"
    assert not (tmp_path / "no").exists()


def test_json_errors_are_json_for_bad_paths_and_bad_usage(tmp_path):
    for args in (["verify", str(tmp_path / "missing"), "--json"], ["inspect", str(tmp_path), "--json"],
                 ["verify", "--json"], ["convert", str(tmp_path), "x", "--to", "zip", "--json"]):
        code, out, err = cli(*args)
        report = json.loads(out)
        assert code == EXIT_UNUSABLE and report["ok"] is False and report["exit_code"] == 2 and err == "", args
        assert report["message"]
    code, out, _ = cli("verify", str(tmp_path / "missing"), "--json")
    assert json.loads(out)["message"] == f"checkpoint path '{tmp_path / 'missing'}' does not exist"


def test_damaged_metadata_exits_1_and_is_json_with_json(tmp_path):
    ckpt = save(tmp_path / "c", {"w": torch.ones(3)})
    (ckpt / ".metadata").write_bytes(b"\x80\x04garbage")
    code, out, _ = cli("verify", str(ckpt), "--json")
    report = json.loads(out)
    assert code == EXIT_DAMAGED and report["status"] == "damaged" and report["error"] == "CorruptCheckpointError"
    assert str(ckpt / ".metadata") in report["message"]
    code, _, err = cli("inspect", str(ckpt))
    assert code == EXIT_DAMAGED and err.startswith(f"error: {ckpt / '.metadata'} is damaged")


def test_verify_reports_the_real_length_of_a_damaged_short_file(tmp_path):
    """A 412 KiB data file with 1 MiB checksum blocks: the bad block is the 412 KiB the file has, not 1 MiB."""
    ckpt = save(tmp_path / "c", {"w": torch.arange(412 * 256, dtype=torch.float32)}, DataStatesConfig(io_engine="threads"))
    metadata = DataStatesReader(ckpt).read_metadata()
    (info,) = metadata.storage_data.values()
    path = ckpt / info.relative_path
    size = path.stat().st_size
    assert 412 * 1024 < size < 1024 * 1024
    with open(path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    code, out, _ = cli("verify", str(ckpt), "--no-progress")
    assert code == EXIT_DAMAGED
    assert f"CORRUPT {info.relative_path} at offset 0 ({size} bytes): checksum mismatch; affects 'w'" in out


def test_no_traceback_from_a_real_process_on_hostile_input(tmp_path):
    ckpt = save(tmp_path / "c", {"w": torch.ones(3)})
    (ckpt / ".metadata").write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "dcp_datastates", "verify", str(ckpt)], capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_DAMAGED and "Traceback" not in done.stderr
    assert done.stderr == f"error: {ckpt / '.metadata'} is empty (0 bytes); the checkpoint is damaged. Load another checkpoint.\n"


def test_readme_cli_commands_run(tmp_path, monkeypatch):
    """Every command of the README's "Command line" block runs on a real checkpoint (bench at a tiny size)."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("\n## Command line\n"):]
    (block,) = re.findall(r"```bash\n(.*?)```", section[: section.index("\n## ", 1)], re.S)
    ckpt = save(tmp_path / "ckpt" / "step-200", {"w": torch.arange(6.0).reshape(2, 3), "step": 200})
    monkeypatch.chdir(tmp_path)
    commands = [line.partition("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 6
    for command in commands:
        args = shlex.split(command.replace("/ckpt/step-200", str(ckpt)))
        assert args[0] == "dcp-datastates", command
        if args[1] == "bench":  # the full-size benchmark is not a test: the same command, tiny
            args = [*args[:2], "--size-gib", "0.01", "--repeats", "1", "--dir", str(tmp_path), "--skip-load",
                    "--skip-verify", "--skip-small", "--json"]
        with contextlib.suppress(SystemExit):
            code, out, err = cli(*args[1:])
        assert code == EXIT_OK, (command, out, err)
        if args[1] == "inspect":
            assert "w" in out and "2x3" in out
        if "--json" in args and args[1] == "verify":
            assert json.loads(out)["status"] == "verified"
        if args[1] == "convert":
            assert torch.load(tmp_path / "step-200.pt", weights_only=True)["w"].equal(torch.arange(6.0).reshape(2, 3))
        if args[1] == "--version":
            assert dcp_datastates.__version__ in out
