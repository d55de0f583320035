"""The integrity policy (if-present / required / keyed seal), convert's refusals, and reads of swapped files.

Each policy is tried against each kind of checkpoint (keyed, unkeyed, stock, saved without
checksums); the issue's fail-open cases are replayed by hand (an emptied seal, a stripped
seal, a forger who recomputes every digest); the CLI's verify flags and exit codes, and
``convert`` pointed into its own input, are checked; and data files swapped for links,
FIFOs or directories after the checks are refused by name. Seeded fuzzing of the same
kinds lives in ``test_fuzz_seal_and_links.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from conftest import small_config
from test_cli_edges import cli  # the CLI in this process: exit code, stdout, stderr, never a traceback
from dcp_datastates import (
    CorruptCheckpointError,
    DataStatesConfig,
    DataStatesError,
    DataStatesReader,
    DataStatesWriter,
    UnverifiedCheckpointError,
)
from dcp_datastates import reader as reader_module
from dcp_datastates import verify as verify_module
from dcp_datastates.checksums import checksums_of, encode_checksum_file, parse_checksum_file
from dcp_datastates.integrity import KEY_ENV, IntegrityPolicy
from dcp_datastates.metadata_check import INTEGRITY_ATTR, metadata_digest, seal_metadata
from dcp_datastates.resume import latest_complete_checkpoint
from dcp_datastates.verify import DAMAGED, UNVERIFIED, VERIFIED, verify_checkpoint

KEY = b"test-key: 0123456789abcdef"
OTHER_KEY = b"another key, 32 bytes long......"
N = 256


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def tiny(value: float) -> dict:
    return {"w": torch.arange(N, dtype=torch.float32) + value, "step": int(value)}


def save(path: Path, value: float = 1.0, **config: object) -> Path:
    dcp.save(tiny(value), storage_writer=DataStatesWriter(path, small_config("threads", **config)), no_dist=True)
    return path


def policy_config(integrity: str = "if-present", key: bytes | None = None) -> DataStatesConfig:
    return DataStatesConfig(integrity=integrity, integrity_key=key)


def unwrap(exc: BaseException) -> BaseException:
    if isinstance(exc, CheckpointException):
        (failure,) = exc.failures.values()
        return failure[0] if isinstance(failure, tuple) else failure
    return exc


def outcome(path: Path, integrity: str = "if-present", key: bytes | None = None) -> tuple[str, object]:
    """``("loaded", step)`` with the loaded step (``w`` must match it exactly), or ``(error class, error)``."""
    out = {"w": torch.zeros(N), "step": -1}
    try:
        dcp.load(out, storage_reader=DataStatesReader(path, config=policy_config(integrity, key)), no_dist=True)
    except (CheckpointException, DataStatesError) as exc:
        error = unwrap(exc)
        assert isinstance(error, DataStatesError), repr(error)
        return type(error).__name__, error
    return "loaded", (out["step"], torch.equal(out["w"], tiny(out["step"])["w"]))


def data_file(path: Path) -> Path:
    return next(path.glob("__*_0.distcp"))


def side_file(path: Path) -> Path:
    return next(path.glob("__*_checksums.json"))


def flip_a_data_byte(path: Path) -> None:
    """Flip one byte in the middle of ``w``'s raw bytes (not its framing)."""
    metadata = pickle.loads((path / ".metadata").read_bytes())
    (info,) = [i for index, i in metadata.storage_data.items() if index.fqn == "w"]
    target = path / info.relative_path
    raw = bytearray(target.read_bytes())
    raw[info.offset + info.length // 2] ^= 0x10
    target.write_bytes(bytes(raw))


def edit_metadata(path: Path, edit) -> None:
    metadata = pickle.loads((path / ".metadata").read_bytes())
    edit(metadata)
    (path / ".metadata").write_bytes(pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL))


def forge(path: Path, keep_mac: bool = False) -> None:
    """A forger without the key: change data, recompute its block checksums, the side file's SHA-256 and the digest."""
    flip_a_data_byte(path)
    side = side_file(path)
    sums = parse_checksum_file(side.read_bytes(), side.name)
    target = data_file(path)
    sums[target.name] = checksums_of(target.read_bytes(), sums[target.name].block_bytes)
    side.write_bytes(encode_checksum_file(sums))

    def reseal(metadata):
        old = dict(vars(metadata)[INTEGRITY_ATTR])
        seal_metadata(metadata, path, old["checksum_files"])  # unkeyed: the forger has no key
        if keep_mac:  # ... and pretends: the old key id (sealed into the digest) and the old HMAC
            record = vars(metadata)[INTEGRITY_ATTR]
            record["key_id"] = old["key_id"]
            record["metadata_sha256"] = metadata_digest(metadata)
            record["mac"] = old["mac"]

    edit_metadata(path, reseal)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("policy")
    dcp.save(tiny(4.0), storage_writer=dcp.FileSystemWriter(root / "stock"), no_dist=True)
    return {
        "keyed": save(root / "keyed", 1.0, integrity_key=KEY),
        "unkeyed": save(root / "unkeyed", 2.0),
        "no-checksums": save(root / "no-checksums", 3.0, checksums=False),
        "stock": root / "stock",
    }


def copy_of(saved: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[kind], tmp_path / kind))


# -- configuration -----------------------------------------------------------------------------------
def test_the_policy_is_validated_and_the_key_never_printed(monkeypatch, tmp_path):
    for bad, words in (({"integrity_key": b"short"}, "at least 16 bytes"),
                       ({"integrity": "sometimes"}, "if-present"),
                       ({"integrity": "required", "checksums": False}, "keep checksums=True"),
                       ({"integrity_key": KEY, "checksums": False}, "keep checksums=True")):
        with pytest.raises(ValueError, match=words):
            DataStatesConfig(**bad)
    config = DataStatesConfig(integrity_key=KEY)
    policy = IntegrityPolicy.of(config)
    for shown in (repr(config), str(config), config.model_dump_json(), repr(policy), str(policy)):
        assert KEY.decode() not in shown and "test-key" not in shown
    assert policy.enforced and policy.key == KEY and policy.key_id in repr(policy)
    monkeypatch.setenv(KEY_ENV, "too short")
    with pytest.raises(ValueError, match=f"the {KEY_ENV} environment variable holds 9 bytes"):
        DataStatesConfig()
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    assert DataStatesConfig().integrity_key.get_secret_value() == KEY  # the variable is the default ...
    assert DataStatesConfig(integrity_key=None).integrity_key is None  # ... which an explicit None overrides
    with pytest.raises(ValueError, match="verify_checksums=False cannot be combined with an integrity key"):
        DataStatesReader(tmp_path, verify_checksums=False)


# -- each policy against each kind of checkpoint ----------------------------------------------------------
EXPECTED = {  # kind -> outcome under (if-present, required, key, other key)
    "keyed": ("loaded", "loaded", "loaded", "another key"),
    "unkeyed": ("loaded", "loaded", "not keyed", "not keyed"),
    "no-checksums": ("loaded", "checksums=False", "not keyed", "not keyed"),
    "stock": ("loaded", "no seal", "no seal", "no seal"),
}
REASON_WORDS = {"another key": "sealed with another key", "not keyed": "its seal is not keyed",
                "checksums=False": "saved with checksums=False", "no seal": "it carries no seal"}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_policy_loads_what_it_vouches_for_and_refuses_the_rest(saved, kind):
    step = {"keyed": 1, "unkeyed": 2, "no-checksums": 3, "stock": 4}[kind]
    policies = [("if-present", None), ("required", None), ("if-present", KEY), ("if-present", OTHER_KEY)]
    for (integrity, key), expected in zip(policies, EXPECTED[kind]):
        what, detail = outcome(saved[kind], integrity, key)
        if expected == "loaded":
            assert (what, detail) == ("loaded", (step, True)), (kind, integrity, key is not None, detail)
            continue
        assert what == "UnverifiedCheckpointError", (kind, integrity, detail)
        message = str(detail)
        assert REASON_WORDS[expected] in message and str(saved[kind]) in message, message
        assert "cannot be verified end to end" in message and "integrity='if-present'" in message
    if kind == "keyed":  # the keyed seal is a plain dict: stock DCP still loads the checkpoint
        out = {"w": torch.zeros(N), "step": -1}
        dcp.load(out, storage_reader=dcp.FileSystemReader(saved[kind]), no_dist=True)
        assert out["step"] == 1 and torch.equal(out["w"], tiny(1)["w"])


# -- the fail-open cases ------------------------------------------------------------------------
def test_an_emptied_seal_with_the_side_file_deleted_and_a_flipped_byte_is_refused_everywhere(saved, tmp_path):
    ckpt = copy_of(saved, "keyed", tmp_path)
    edit_metadata(ckpt, lambda m: vars(m)[INTEGRITY_ATTR].__setitem__("checksum_files", {}))
    side_file(ckpt).unlink()
    flip_a_data_byte(ckpt)
    for integrity, key in (("if-present", None), ("required", None), ("if-present", KEY)):
        what, error = outcome(ckpt, integrity, key)
        assert what == "CorruptCheckpointError" and "has been altered since it was saved" in str(error)
        assert str(ckpt / ".metadata") in str(error)
    assert verify_checkpoint(ckpt, policy=IntegrityPolicy()).status == DAMAGED
    assert cli("verify", str(ckpt), "--no-progress")[0] == 1


def test_a_stripped_seal_loads_unverified_only_under_if_present(saved, tmp_path):
    ckpt = copy_of(saved, "keyed", tmp_path)
    edit_metadata(ckpt, lambda m: vars(m).pop(INTEGRITY_ATTR))
    side_file(ckpt).unlink()
    flip_a_data_byte(ckpt)
    # if-present: a checkpoint without a seal is indistinguishable from a stock one -- the documented limit
    assert outcome(ckpt)[0] == "loaded" and outcome(ckpt)[1] == (1, False)
    for integrity, key in (("required", None), ("if-present", KEY)):
        what, error = outcome(ckpt, integrity, key)
        assert what == "UnverifiedCheckpointError" and "it carries no seal" in str(error)
    code, out, _ = cli("verify", str(ckpt), "--no-progress")
    assert code == 3 and "UNVERIFIED (no seal)" in out and "saved without checksums" not in out
    assert cli("verify", str(ckpt), "--no-progress", "--integrity", "required")[0] == 3
    (tmp_path / "key").write_bytes(KEY + b"\n")
    assert cli("verify", str(ckpt), "--no-progress", "--key-file", str(tmp_path / "key"))[0] == 3


@pytest.mark.parametrize("keep_mac", [False, True], ids=["unkeyed-reseal", "old-mac-kept"])
def test_a_forger_who_recomputes_every_digest_is_caught_only_by_the_key(saved, tmp_path, monkeypatch, keep_mac):
    ckpt = copy_of(saved, "keyed", tmp_path)
    forge(ckpt, keep_mac)
    for integrity in ("if-present", "required"):  # an unkeyed seal cannot tell a forger: the documented limit
        assert outcome(ckpt, integrity) == ("loaded", (1, False))
    what, error = outcome(ckpt, key=KEY)
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    code, out, _ = cli("verify", str(ckpt), "--json")  # the key from the environment
    report = json.loads(out)
    if keep_mac:
        assert what == "CorruptCheckpointError" and "does not verify under your integrity key" in str(error)
        assert code == 1 and report["status"] == DAMAGED
    else:
        assert what == "UnverifiedCheckpointError" and "its seal is not keyed" in str(error)
        assert code == 3 and report["status"] == UNVERIFIED and report["keyed"] is False
    assert cli("verify", str(ckpt), "--json", "--no-key")[0] == 0  # unkeyed: the forgery verifies


# -- the CLI -------------------------------------------------------------------------------------------
def test_verify_takes_the_key_from_a_file_or_a_variable_never_the_command_line(saved, tmp_path, monkeypatch):
    ckpt = saved["keyed"]
    (tmp_path / "key").write_bytes(KEY + b"\n")
    (tmp_path / "short").write_bytes(b"short\n")
    code, out, _ = cli("verify", str(ckpt), "--no-progress", "--key-file", str(tmp_path / "key"))
    assert code == 0 and out.startswith("VERIFIED: 2 files") and f"seal keyed (key id {IntegrityPolicy(key=KEY).key_id})" in out
    monkeypatch.setenv("MY_KEY", KEY.decode())
    code, out, _ = cli("verify", str(ckpt), "--json", "--key-env", "MY_KEY")
    report = json.loads(out)
    assert code == 0 and report["keyed"] and report["required"] and report["unverified_reasons"] == []
    code, out, _ = cli("verify", str(ckpt), "--no-progress")
    assert code == 0 and "seal unkeyed" in out  # no key given: the seal's digest is all that is checked
    monkeypatch.setenv("MY_KEY", OTHER_KEY.decode())
    code, out, _ = cli("verify", str(ckpt), "--no-progress", "--key-env", "MY_KEY")
    assert code == 3 and "UNVERIFIED (not sealed with your key)" in out and "sealed with another key" in out
    for args, words in ((["--key-env", "UNSET_VARIABLE"], "is not set"), (["--key-file", str(tmp_path / "short")], "at least 16"),
                        (["--key-file", str(tmp_path / "missing")], "cannot read the key file")):
        code, _, err = cli("verify", str(ckpt), *args)
        assert code == 2 and words in err, err
    code, out, _ = cli("convert", str(saved["stock"]), str(tmp_path / "o.pt"), "--to", "torch", "--integrity", "required", "--json")
    report = json.loads(out)
    assert code == 3 and report["error"] == "UnverifiedCheckpointError" and report["status"] == "unverified"
    assert not (tmp_path / "o.pt").exists()


def test_resume_skips_checkpoints_the_policy_would_refuse(saved, tmp_path):
    shutil.copytree(saved["keyed"], tmp_path / "step-1")
    shutil.copytree(saved["unkeyed"], tmp_path / "step-2")
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "step-2"
    assert latest_complete_checkpoint(tmp_path, policy=IntegrityPolicy(key=KEY)) == tmp_path / "step-1"
    assert latest_complete_checkpoint(tmp_path, policy=IntegrityPolicy(key=OTHER_KEY)) is None


# -- convert never writes into its input --------------------------------------------------------------
def test_convert_refuses_an_output_inside_or_equal_to_its_input(saved, tmp_path):
    ckpt = copy_of(saved, "unkeyed", tmp_path)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "link").symlink_to(ckpt / ".metadata")
    (tmp_path / "dirlink").symlink_to(ckpt)
    cases = {
        ckpt / ".metadata": "inside the input checkpoint",
        data_file(ckpt): "inside the input checkpoint",
        ckpt / "new.pt": "inside the input checkpoint",
        tmp_path / "link": "inside the input checkpoint",
        tmp_path / "dirlink" / "x.pt": "inside the input checkpoint",
        ckpt: "the input checkpoint",
        tmp_path / "afile" / "out.pt": f"'{tmp_path / 'afile'}' is a file, not a directory",
    }
    for out, words in cases.items():
        for fmt in ("torch", "safetensors"):
            code, _, err = cli("convert", str(ckpt), str(out), "--to", fmt)
            assert code == 2 and words in err, (out, err)
            assert "would destroy it" in err or "not a directory" in err, err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert cli("verify", str(ckpt), "--no-progress")[0] == 0
    assert cli("convert", str(ckpt), str(tmp_path / "out.pt"), "--to", "torch")[0] == 0
    assert torch.load(tmp_path / "out.pt", weights_only=True)["step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


# -- data files swapped after the checks --------------------------------------------------------------
@pytest.mark.parametrize("swap", ["symlink", "fifo", "directory"])
def test_a_data_file_swapped_after_the_checks_is_refused_naming_it(saved, tmp_path, monkeypatch, swap):
    ckpt = copy_of(saved, "unkeyed", tmp_path)
    target = data_file(ckpt)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(target.read_bytes())

    def do_swap() -> None:
        target.unlink()
        if swap == "symlink":
            target.symlink_to(outside)
        elif swap == "fifo":
            os.mkfifo(target)  # opening it without O_NONBLOCK would hang the load
        else:
            target.mkdir()

    real_plan = reader_module.plan_reads

    def plan_then_swap(*args, **kwargs):  # after every check of the read path, before the first open
        plan = real_plan(*args, **kwargs)
        do_swap()
        return plan

    monkeypatch.setattr(reader_module, "plan_reads", plan_then_swap)
    what, error = outcome(ckpt)
    kind = "a symbolic link" if swap == "symlink" else "not a regular file"
    assert what == "CorruptCheckpointError" and f"data file {target} is {kind}" in str(error), error
    monkeypatch.undo()

    real_problems = verify_module.data_file_problems
    shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    target.write_bytes(outside.read_bytes())

    def check_then_swap(*args, **kwargs):
        problems = real_problems(*args, **kwargs)
        do_swap()
        return problems

    monkeypatch.setattr(verify_module, "data_file_problems", check_then_swap)
    report = verify_checkpoint(ckpt, policy=IntegrityPolicy())
    assert report.status == DAMAGED and report.problems[0].file == target.name and kind in report.problems[0].reason


# -- docs/integrity.md: every code block runs ---------------------------------------------------------
DOCS = Path(__file__).resolve().parent.parent / "docs" / "integrity.md"


def test_the_examples_of_docs_integrity_run(saved, tmp_path, monkeypatch):
    """Its ``python`` blocks run as written; its ``bash`` block runs on checkpoints made here, each exit as commented."""
    text = DOCS.read_text()
    python_blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (bash_block,) = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert python_blocks
    for block in python_blocks:
        exec(compile(block, str(DOCS), "exec"), {"__name__": "__docs__"})
    root = tmp_path / "ckpt"
    root.mkdir()
    shutil.copytree(saved["keyed"], root / "step-7")
    shutil.copytree(saved["stock"], root / "stock")
    forge(Path(shutil.copytree(saved["keyed"], root / "forged")), keep_mac=True)
    (tmp_path / "key").write_bytes(KEY + b"\n")
    for line in filter(None, (raw.strip() for raw in bash_block.splitlines())):
        line = line.replace("/ckpt", str(root)).replace("~/.ckpt.key", str(tmp_path / "key"))
        exported = re.fullmatch(r'export (\w+)="\$\(cat (\S+)\)"', line)
        if exported:
            monkeypatch.setenv(exported[1], Path(exported[2]).read_text().strip())
            continue
        command, _, comment = line.partition("#")
        args = shlex.split(command)
        assert args[0] == "dcp-datastates", line
        code, out, err = cli(*args[1:])
        assert code == int(re.search(r"exit (\d)", comment)[1]), (line, out, err)
