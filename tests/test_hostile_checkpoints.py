"""Hostile and damaged checkpoints are refused with our typed errors, never obeyed (issue 12).

Each case edits a real checkpoint on disk the way an attacker or a failing disk would and
asserts the exact error class and that it names the file; planted commands leave a marker
file that must never appear. Cases that could crash or exhaust a process run in a
subprocess with a timeout.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from conftest import small_config
from dcp_datastates import (
    CheckpointIOError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    DataStatesError,
    DataStatesReader,
    DataStatesWriter,
    UnsafeCheckpointError,
)
from dcp_datastates.cli import main as cli_main
from dcp_datastates.metadata_check import INTEGRITY_ATTR, metadata_digest, seal_metadata, validate_metadata
from dcp_datastates.read_plan import plan_reads, stored_tensors
from dcp_datastates.resume import latest_complete_checkpoint, list_complete_checkpoints

STATE = {"w": torch.arange(3000.0), "b": torch.arange(7, dtype=torch.int64), "step": 42}


def save(path: Path, state: dict | None = None, **config: object) -> Path:
    dcp.save(state or STATE, storage_writer=DataStatesWriter(path, small_config("threads", **config)), no_dist=True)
    return path


def load(path: Path, **reader: object) -> dict:
    out = {"w": torch.zeros(3000), "b": torch.zeros(7, dtype=torch.int64), "step": 0}
    dcp.load(out, storage_reader=DataStatesReader(path, **reader), no_dist=True)
    return out


def load_error(path: Path, **reader: object) -> BaseException:
    """The error a load raises, unwrapped from DCP's CheckpointException (exactly one rank's)."""
    try:
        load(path, **reader)
    except CheckpointException as exc:
        (failure,) = exc.failures.values()
        return failure[0] if isinstance(failure, tuple) else failure
    except DataStatesError as exc:
        return exc
    raise AssertionError("the load succeeded")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in this process (``tests/test_cli_edges.py`` runs it as a subprocess too)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    done = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    return done


def rewrite_metadata(path: Path, edit, reseal: bool = True) -> None:
    """Edit ``.metadata`` as an attacker with write access would: and recompute the seal so only our checks remain."""
    metadata = pickle.loads((path / ".metadata").read_bytes())
    edit(metadata)
    if reseal and INTEGRITY_ATTR in vars(metadata):
        names = list(vars(metadata)[INTEGRITY_ATTR]["checksum_files"])
        seal_metadata(metadata, path, names)
    (path / ".metadata").write_bytes(pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL))


def side_file(path: Path) -> Path:
    (found,) = path.glob("__*_checksums.json")
    return found


def record_of(path: Path, key: str):
    metadata = DataStatesReader(path).read_metadata()
    (info,) = [i for idx, i in metadata.storage_data.items() if idx.fqn == key]
    return info


# -- 12.1: no code runs, no name resolves by dotted path ------------------------------------------
def dotted_global_pickle(command: str) -> bytes:
    """100 bytes that run ``command`` under plain pickle: os.system resolved *through* DCP's metadata module."""
    module, name = b"torch.distributed.checkpoint.metadata", b"os.system"
    cmd = command.encode()
    return (b"\x80\x04" + b"\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name + b"\x93"
            + b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85R.")


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def stealth_metadata_pickle(path: Path, command: str) -> bytes:
    """A real, loadable Metadata whose planner_data runs ``command`` via the dotted name (protocol 4, GLOBAL)."""
    metadata = pickle.loads((path / ".metadata").read_bytes())
    metadata.planner_data = {"w": ("w",), "hidden": _System(command)}
    vars(metadata).pop(INTEGRITY_ATTR)
    data = pickle.dumps(metadata, protocol=2).replace(b"\x80\x02", b"\x80\x04", 1)
    plain = f"c{os.system.__module__}\nsystem\n".encode()
    assert plain in data
    return data.replace(plain, b"ctorch.distributed.checkpoint.metadata\nos.system\n")


@pytest.mark.parametrize("variant", ["dotted", "stealth", "plain_global"])
def test_metadata_that_runs_a_command_is_refused_everywhere(tmp_path, variant):
    ckpt = save(tmp_path / "c")
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    if variant == "dotted":
        data = dotted_global_pickle(command)
    elif variant == "stealth":
        data = stealth_metadata_pickle(ckpt, command)
    else:
        data = pickle.dumps(_System(command))
    (ckpt / ".metadata").write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match=r"refers to .*system, which is not a DCP metadata type.*trust_checkpoint=True"):
        DataStatesReader(ckpt).read_metadata()
    assert isinstance(load_error(ckpt), UnsafeCheckpointError)
    assert latest_complete_checkpoint(tmp_path) is None  # resume never unpickles it unsafely either
    for command_line in (["inspect", str(ckpt)], ["verify", str(ckpt)], ["convert", str(ckpt), str(tmp_path / "o.pt"), "--to", "torch"]):
        done = run_cli(*command_line)
        assert done.returncode == 2 and "not a DCP metadata type" in done.stderr, done.stderr
    assert not marker.exists()
    if variant == "stealth":  # the attack is real: stock unpickling runs it, and then loads normally
        metadata = pickle.loads(data)
        assert marker.exists() and metadata.planner_data["w"] == ("w",)


def test_only_exact_names_resolve(tmp_path):
    from dcp_datastates.safe_pickle import load_metadata_bytes

    for module, name in [("torch.distributed.checkpoint.metadata", "os.system"), ("torch", "load"),
                         ("torch.distributed.checkpoint.metadata", "Metadata.__init__"), ("builtins", "eval"),
                         ("builtins", "getattr"), ("posix", "system"), ("pathlib", "Path.write_text"),
                         ("torch.serialization", "load"), ("collections", "OrderedDict.fromkeys")]:
        data = b"\x80\x04\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93."
        with pytest.raises(UnsafeCheckpointError, match=rf"refers to {module}\.{name}"):
            load_metadata_bytes(data, "x/.metadata", trust=False)
    # what the allowlist does admit cannot reach code: pathlib becomes a plain string
    path_pickle = pickle.dumps(Path("/a/b"), protocol=4)
    assert load_metadata_bytes(path_pickle, "x", trust=False) == "/a/b"


# -- 12.2: nothing outside the directory is opened ------------------------------------------------
@pytest.mark.parametrize("bad", ["../other/__0_x_0.distcp", "/etc/passwd", "", ".", "..", "sub/file.distcp",
                                 "a\\b.distcp", "nul\0byte.distcp"])
def test_record_paths_outside_the_checkpoint_are_refused(tmp_path, bad):
    outside = save(tmp_path / "other")
    ckpt = save(tmp_path / "c")
    del outside

    def point_away(metadata):
        for info in metadata.storage_data.values():
            if info.relative_path.endswith("_0.distcp"):
                info.relative_path = bad

    rewrite_metadata(ckpt, point_away)
    opened: list[str] = []
    with pytest.raises(CorruptCheckpointError, match=r"names data file .*which (is a path|is not a file name)"):
        with _recording_opens(opened):
            DataStatesReader(ckpt).read_metadata()
    assert not [p for p in opened if "other" in p or p.startswith("/etc")], opened
    assert isinstance(load_error(ckpt), CorruptCheckpointError)
    done = run_cli("verify", str(ckpt), "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["error"] == "CorruptCheckpointError"


class _recording_opens:
    """Record every path opened through ``open``/``os.open`` (audit hook, active only inside the block)."""

    active: list[str] | None = None
    installed = False

    def __init__(self, into: list[str]) -> None:
        self.into = into
        if not _recording_opens.installed:
            sys.addaudithook(_recording_opens._hook)
            _recording_opens.installed = True

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        if event == "open" and _recording_opens.active is not None and isinstance(args[0], (str, bytes, os.PathLike)):
            _recording_opens.active.append(os.fsdecode(args[0]))

    def __enter__(self):
        _recording_opens.active = self.into

    def __exit__(self, *exc):
        _recording_opens.active = None


def test_data_file_that_is_a_symlink_or_fifo_is_refused(tmp_path):
    ckpt = save(tmp_path / "c")
    target = next(p for p in ckpt.iterdir() if p.name.endswith("_1.distcp"))
    secret = tmp_path / "secret"
    secret.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(secret)
    assert "symbolic link" in str(load_error(ckpt, verify_checksums=False))
    target.unlink()
    os.mkfifo(target)  # opening a FIFO would block forever
    err = load_error(ckpt, verify_checksums=False)
    assert isinstance(err, CorruptCheckpointError) and "not a regular file" in str(err)


# -- 12.3: integrity fails closed ------------------------------------------------------------------
def test_deleting_the_checksum_file_cannot_hide_a_flipped_byte(tmp_path):
    ckpt = save(tmp_path / "c")
    info = record_of(ckpt, "w")
    with open(ckpt / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    side = side_file(ckpt)
    side.unlink()
    err = load_error(ckpt)
    assert isinstance(err, ChecksumMismatchError) and f"checksum file {side.name}" in str(err) and "is missing" in str(err)
    done = run_cli("verify", str(ckpt), "--no-progress")
    assert done.returncode == 1 and f"CORRUPT {side.name}" in done.stdout and "DAMAGED" in done.stdout
    # the explicit switch still reads it, unverified (and shows the damage is real)
    assert not torch.equal(load(ckpt, verify_checksums=False)["w"], STATE["w"])


@pytest.mark.parametrize("block_bytes", [-4096, 0, 3000, 2**62, "8192"])
def test_edited_checksum_file_is_named_whether_or_not_the_seal_is_recomputed(tmp_path, block_bytes):
    ckpt = save(tmp_path / "c")
    side = side_file(ckpt)
    document = json.loads(side.read_text())
    for entry in document["files"].values():
        entry["block_bytes"] = block_bytes
    side.write_text(json.dumps(document))
    err = load_error(ckpt)
    assert isinstance(err, ChecksumMismatchError) and "has been altered" in str(err) and side.name in str(err)
    rewrite_metadata(ckpt, lambda m: None)  # an attacker who also recomputes the seal meets the schema
    err = load_error(ckpt)
    assert isinstance(err, CorruptCheckpointError) and f"checksum file {side.name} is malformed" in str(err)
    done = run_cli("verify", str(ckpt), "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["status"] == "damaged" and report["problems"][0]["file"] == side.name


def test_altered_metadata_is_caught_by_its_seal(tmp_path):
    ckpt = save(tmp_path / "c")

    def swap_lengths(metadata):
        info = next(i for idx, i in metadata.storage_data.items() if idx.fqn == "b")
        info.length += 1

    rewrite_metadata(ckpt, swap_lengths, reseal=False)
    err = load_error(ckpt)
    assert isinstance(err, CorruptCheckpointError) and "has been altered since it was saved" in str(err)
    assert run_cli("verify", str(ckpt)).returncode == 1


def test_sealed_checkpoints_stay_readable_by_stock_dcp_and_unsealed_ones_are_unverified(tmp_path):
    ckpt = save(tmp_path / "c")
    seal = vars(pickle.loads((ckpt / ".metadata").read_bytes()))[INTEGRITY_ATTR]
    assert list(seal["checksum_files"]) == [side_file(ckpt).name] and len(seal["metadata_sha256"]) == 64
    out = {"w": torch.zeros(3000), "b": torch.zeros(7, dtype=torch.int64), "step": 0}
    dcp.load(out, storage_reader=dcp.FileSystemReader(ckpt), no_dist=True)
    assert torch.equal(out["w"], STATE["w"]) and out["step"] == 42
    plain = save(tmp_path / "plain", checksums=False)
    assert not list(plain.glob("*checksums.json"))
    assert load(plain)["step"] == 42
    done = run_cli("verify", str(plain), "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 3 and report["status"] == "unverified" and report["saved_with_checksums"] is False
    done = run_cli("verify", str(ckpt), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["status"] == "verified"


# -- 12.4: malformed input gives typed errors naming the file -------------------------------------
MALFORMED_CHECKSUM_FILES = {
    "not json": b"{not json",
    "empty": b"",
    "list": b"[]",
    "no files": b'{"algorithm": "xxh64"}',
    "files not a dict": b'{"algorithm": "xxh64", "files": []}',
    "unknown algorithm": b'{"algorithm": "md5", "files": {}}',
    "entry not a dict": b'{"algorithm": "xxh64", "files": {"F": 3}}',
    "missing size": b'{"algorithm": "xxh64", "files": {"F": {"block_bytes": 4096, "blocks": []}}}',
    "negative size": b'{"algorithm": "xxh64", "files": {"F": {"size": -1, "block_bytes": 4096, "blocks": []}}}',
    "size string": b'{"algorithm": "xxh64", "files": {"F": {"size": "1", "block_bytes": 4096, "blocks": ["0000000000000000"]}}}',
    "zero block": b'{"algorithm": "xxh64", "files": {"F": {"size": 1, "block_bytes": 0, "blocks": []}}}',
    "too few blocks": b'{"algorithm": "xxh64", "files": {"F": {"size": 9000, "block_bytes": 4096, "blocks": ["0000000000000000"]}}}',
    "bad hex": b'{"algorithm": "xxh64", "files": {"F": {"size": 1, "block_bytes": 4096, "blocks": ["xyz"]}}}',
    "huge size": b'{"algorithm": "xxh64", "files": {"F": {"size": 1e300, "block_bytes": 4096, "blocks": []}}}',
    "path name": b'{"algorithm": "xxh64", "files": {"../F": {"size": 0, "block_bytes": 4096, "blocks": []}}}',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "extra field": b'{"algorithm": "xxh64", "files": {}, "exec": 1}',
}


@pytest.mark.parametrize("name", sorted(MALFORMED_CHECKSUM_FILES))
def test_malformed_checksum_files_give_one_typed_error_naming_the_file(tmp_path, name):
    ckpt = save(tmp_path / "c")
    side = side_file(ckpt)
    side.write_bytes(MALFORMED_CHECKSUM_FILES[name].replace(b'"F"', json.dumps(record_of(ckpt, "w").relative_path).encode()))
    rewrite_metadata(ckpt, lambda m: None)  # sealed over the bad bytes, so the schema is what must refuse them
    err = load_error(ckpt)
    assert isinstance(err, CorruptCheckpointError) and f"checksum file {side.name}" in str(err), repr(err)
    done = run_cli("verify", str(ckpt), "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["problems"][0]["file"] == side.name


def test_checksum_file_that_is_a_directory_is_named(tmp_path):
    ckpt = save(tmp_path / "c")
    side = side_file(ckpt)
    side.unlink()
    side.mkdir()
    err = load_error(ckpt)
    assert isinstance(err, CorruptCheckpointError) and "is not a regular file" in str(err) and side.name in str(err)


def _metadata_bytes(tmp_path: Path) -> bytes:
    return (save(tmp_path / "src") / ".metadata").read_bytes()


def malformed_metadata(tmp_path: Path) -> dict[str, bytes]:
    good = _metadata_bytes(tmp_path)
    return {
        "empty": b"",
        "truncated half": good[: len(good) // 2],
        "truncated by one": good[:-1],
        "garbage": bytes(range(256)) * 4,
        "an int": pickle.dumps(7),
        "a dict": pickle.dumps({"state_dict_metadata": {}}),
        "claims 1 TiB": b"\x80\x05\x8e" + struct.pack("<Q", 2**40) + b"abc",
        "claims 1 TiB unicode": b"\x80\x05\x8d" + struct.pack("<Q", 2**40) + b"abc",
        "claims 2 GiB": b"\x80\x05\x8e" + struct.pack("<Q", 2**31) + b"abc",
        "memo index 2**31": b"\x80\x04N\x72" + struct.pack("<I", 2**31 - 1) + b".",
        "huge int": b"\x80\x02\x8b" + struct.pack("<i", 200) + b"\x01" * 200 + b".",
        "deep tuples": b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"Ns.",
        "copy bomb": b"\x80\x04\x8c\x08builtins\x94\x8c\x05tuple\x94\x93\x94]\x94(" + b"h\x01" * 50_000 + b"e"
                     + b"h\x02h\x03\x85R0" * 50_000 + b"N.",
        "negative offset": _edited(good, lambda m: _first_record(m).__setattr__("offset", -10)),
        "offset not int": _edited(good, lambda m: _first_record(m).__setattr__("offset", "0")),
        "huge length": _edited(good, lambda m: _first_record(m).__setattr__("length", 2**60)),
        "tensor of 1 TiB": _edited(good, _claim_huge_tensor),
        "chunk without record": _edited(good, lambda m: m.storage_data.clear()),
        "unknown field": _edited(good, lambda m: _first_record(m).__setattr__("extra", 1)),
        "storage_data list": _edited(good, lambda m: setattr(m, "storage_data", [])),
        "seal malformed": _edited(good, lambda m: vars(m).__setitem__(INTEGRITY_ATTR, {"format": 1})),
        "sharing bomb": _edited(good, _sharing_bomb),
    }


def _first_record(metadata):
    return next(iter(metadata.storage_data.values()))


def _claim_huge_tensor(metadata):
    md = metadata.state_dict_metadata["w"]
    md.size = torch.Size([2**38])


def _sharing_bomb(metadata):
    x: list = ["x"]
    for _ in range(60):
        x = [x, x]  # 2**60 leaves by path, 120 objects in the pickle
    metadata.planner_data = {"w": x}


def _edited(good: bytes, edit) -> bytes:
    metadata = pickle.loads(good)
    vars(metadata).pop(INTEGRITY_ATTR, None)  # the structure check, not the seal, must catch these
    edit(metadata)
    return pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)


def test_malformed_metadata_gives_one_typed_error_in_bounded_time_and_memory(tmp_path):
    """Runs in a subprocess: a crash (deep nesting), a stall or an allocation would kill it, not pytest."""
    cases = malformed_metadata(tmp_path)
    cases_file = tmp_path / "cases.pkl"
    cases_file.write_bytes(pickle.dumps(cases))
    script = textwrap.dedent(f"""
        import json, pickle, resource, shutil, time, pathlib
        from dcp_datastates import DataStatesReader, DataStatesError
        cases = pickle.loads(pathlib.Path({str(cases_file)!r}).read_bytes())
        src, out = pathlib.Path({str(tmp_path / "src")!r}), {{}}
        for name, data in cases.items():
            ckpt = pathlib.Path({str(tmp_path)!r}) / ("m" + str(len(out)))
            shutil.copytree(src, ckpt)
            (ckpt / ".metadata").write_bytes(data)
            rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
            try:
                DataStatesReader(ckpt).read_metadata()
                out[name] = ["loaded", ""]
            except DataStatesError as exc:
                out[name] = [type(exc).__name__, str(exc)]
            out[name] += [time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0]
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert set(results) == set(cases)
    for name, (kind, message, seconds, rss_kib) in results.items():
        assert kind == "CorruptCheckpointError", (name, kind, message)
        assert ".metadata" in message, (name, message)
        assert seconds < 20 and rss_kib < 512 * 1024, (name, seconds, rss_kib)
    assert "a length field claims 1099511627776 bytes but only 3 remain" in results["claims 1 TiB"][1]
    assert "more than 100 levels deep" in results["deep tuples"][1]
    assert "is empty (0 bytes)" in results["empty"][1]
    assert "not an integer in [0," in results["negative offset"][1]
    assert "is not covered by its 1 chunk(s)" in results["tensor of 1 TiB"][1]
    assert "copy more elements than" in results["copy bomb"][1]
    assert "more objects than its size allows" in results["sharing bomb"][1]


def test_negative_offsets_never_reach_the_disk(tmp_path):
    ckpt = save(tmp_path / "c")
    rewrite_metadata(ckpt, lambda m: _first_record(m).__setattr__("offset", -4096))
    err = load_error(ckpt)
    assert isinstance(err, CorruptCheckpointError) and "offset is -4096" in str(err)
    done = run_cli("verify", str(ckpt))
    assert done.returncode == 1 and "offset is -4096" in done.stderr


# -- 12.5: resume picks only intact checkpoints, by step number -------------------------------------
def test_resume_orders_by_step_and_skips_broken_or_unrecognized(tmp_path):
    for name in ["step-9", "step_10", "step11", "12", "backup-2024", "step-100", "step-101", "step-102", "step-103", "latest"]:
        save(tmp_path / name)
    (tmp_path / "step-100" / ".metadata").write_bytes(b"")  # zero-length .metadata
    next((tmp_path / "step-101").glob("*_0.distcp")).unlink()  # data file missing
    data = next((tmp_path / "step-102").glob("*_0.distcp"))
    os.truncate(data, data.stat().st_size - 1)  # short by a byte
    side_file(tmp_path / "step-103").unlink()  # sealed with checksums, side file gone
    assert [p.name for p in list_complete_checkpoints(tmp_path)] == ["step-9", "step_10", "step11", "12"]
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "12"
    assert load(latest_complete_checkpoint(tmp_path))["step"] == 42


# -- 12.6: read planning is linear in records -------------------------------------------------------
def _many_records(n: int):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    sdm = {f"k{i}": BytesStorageMetadata() for i in range(n)}
    storage = {MetadataIndex(f"k{i}"): _StorageInfo("__0_ab_1.distcp", 16 * i, 16) for i in range(n)}
    return Metadata(sdm, planner_data={f"k{i}": (f"k{i}",) for i in range(n)}, storage_data=storage)


def test_one_shared_many_dimensional_chunk_repeated_is_refused_by_its_size(tmp_path):
    """Equal values may be pickled once, but each use of a size is still charged: 20,000 references to
    one 64-dimension chunk (a 41 KB file) would otherwise pass the check and make a 1.5 GB seal digest."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata,
    )

    dims = (1,) * 64
    chunk = ChunkStorageMetadata(torch.Size((0,) * 64), torch.Size(dims))
    md = Metadata({"t": TensorStorageMetadata(TensorProperties(dtype=torch.uint8), torch.Size(dims), [chunk] * 20_000)})
    md.storage_data = {MetadataIndex("t", (0,) * 64): _StorageInfo("__0_ab_0.distcp", 0, 1)}
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "__0_ab_0.distcp").write_bytes(b"\0")
    (directory / ".metadata").write_bytes(pickle.dumps(md, protocol=pickle.HIGHEST_PROTOCOL))
    start = time.perf_counter()
    error = load_error(directory)
    assert isinstance(error, CorruptCheckpointError) and "describes more objects than its size allows" in str(error)
    assert time.perf_counter() - start < 10


def _tensor_with_chunks(shape: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]):
    """A ``.metadata`` of one float32 tensor stored as ``chunks`` (offsets, sizes), each in a record of its own."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata,
    )

    stored = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks]
    md = Metadata({"t": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape), stored)})
    md.storage_data = {MetadataIndex("t", torch.Size(o)): _StorageInfo("__0_ab_0.distcp", 64 * i, 4 * math.prod(s))
                       for i, (o, s) in enumerate(chunks)}
    return md


@pytest.mark.parametrize("shape, chunks, message", [
    ((4,), [((0,), (2,)), ((1,), (2,))], r"chunks of 't' at \[0\] and \[1\] overlap"),  # same volume, gap at [3]
    ((2, 2), [((0, 0), (1, 2)), ((0, 1), (1, 1)), ((1, 0), (1, 1))],
     r"chunks of 't' at \[0, 0\] and \[0, 1\] overlap"),  # 4 elements, [1, 1] missing
    ((2, 3), [((0, 0), (2, 3)), ((0, 0), (2, 3))], "hold 12 elements, its shape \\[2, 3\\] 6: they overlap"),
])
def test_overlapping_chunks_are_refused_even_where_their_volume_adds_up(shape, chunks, message):
    """Overlapping chunks are what no DCP save writes: loading them would leave elements unread (a gap of
    the overlap's size) or depend on the read order, so the check refuses them before any read."""
    with pytest.raises(CorruptCheckpointError, match=message):
        validate_metadata(_tensor_with_chunks(shape, chunks), "x/.metadata")


def test_chunks_tiling_a_tensor_pass_the_overlap_check_in_any_order():
    import random

    grid = [((r, c), (1, 2)) for r in range(64) for c in range(0, 64, 2)]  # 2,048 chunks of a 64x64 tensor
    random.Random(0).shuffle(grid)
    start = time.perf_counter()
    validate_metadata(_tensor_with_chunks((64, 64), grid), "x/.metadata")
    validate_metadata(_tensor_with_chunks((64, 64), [((0, 0), (64, 32)), ((0, 32), (64, 32)), ((5, 7), (0, 0))]),
                      "x/.metadata")  # an empty chunk overlaps nothing
    assert time.perf_counter() - start < 5
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        validate_metadata(_tensor_with_chunks((64, 64), grid[:-1] + [((0, 1), (1, 2))]), "x/.metadata")


def test_chunks_open_along_every_dimension_cost_what_their_file_allows():
    """4,096 chunks tiling a 40-dimension tensor as a hypercube (every chunk open along every dimension
    of the sweep): 16 million dimension comparisons from a ~1 MB file, refused by its budget in moments."""
    from dcp_datastates.safe_pickle import load_metadata_bytes

    dims, bits = 40, 12
    chunks = [((0,) * (dims - bits) + tuple((i >> b) & 1 for b in range(bits)), (2,) * (dims - bits) + (1,) * bits)
              for i in range(1 << bits)]
    data = pickle.dumps(_tensor_with_chunks((2,) * dims, chunks), protocol=pickle.HIGHEST_PROTOCOL)
    loaded = load_metadata_bytes(data, "x/.metadata", trust=False)
    start = time.perf_counter()
    with pytest.raises(CorruptCheckpointError, match="describes more objects than its size allows"):
        validate_metadata(loaded, "x/.metadata", budget=8 * len(data) + 100_000)  # the loader's budget
    assert time.perf_counter() - start < 5


def test_metadata_check_and_read_planning_are_linear_in_records():
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    timings = {}
    for n in (10_000, 100_000):
        metadata = _many_records(n)
        data = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        from dcp_datastates.safe_pickle import load_metadata_bytes

        gc.collect()
        gc.disable()  # the collector's passes grow with every live object: a cost of the process, not of the algorithm
        try:
            start = time.perf_counter()
            loaded = load_metadata_bytes(data, "big/.metadata", trust=False)
            validate_metadata(loaded, "big/.metadata", budget=8 * len(data) + 100_000)
            metadata_digest(loaded)
            items = [ReadItem(LoadItemType.BYTE_IO, MetadataIndex(f"k{i}"), [], MetadataIndex(f"k{i}"), [], [])
                     for i in range(n)]
            plan = plan_reads(items, loaded.storage_data, stored_tensors(loaded), {"__0_ab_1.distcp": 16 * n}, {},
                              64 * 1024**2)
            timings[n] = time.perf_counter() - start
        finally:
            gc.enable()
        assert sum(len(w.records) for w in plan.windows) == n
    # 10x the records may cost at most ~25x the time (linear plus noise on a shared 2-core machine), and
    # 100k records plan in seconds, not the minutes a quadratic planner took
    assert timings[100_000] < 25 * timings[10_000] + 1.0 and timings[100_000] < 60, timings


# -- issue 17.2: a flipped bit in a saved non-tensor object is caught, naming the key --------------
def test_flipped_bit_in_a_saved_object_fails_the_load_naming_the_key(tmp_path):
    ckpt = save(tmp_path / "c", {"w": torch.arange(3000.0), "b": torch.arange(7, dtype=torch.int64), "step": 12345})
    info = record_of(ckpt, "step")
    record = (ckpt / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
    where = info.offset + record.index(b"M" + struct.pack("<H", 12345)) + 1  # the pickled int (BININT2)
    with open(ckpt / info.relative_path, "r+b") as f:
        f.seek(where)
        f.write(bytes([record[where - info.offset] ^ 0x01]))
    err = load_error(ckpt)
    assert isinstance(err, ChecksumMismatchError), repr(err)
    assert f"checksum mismatch in {info.relative_path}" in str(err) and "'step'" in str(err)
    # without our checksums, the archive's own CRC-32 still refuses it (torch.load alone would not: it
    # loads the flipped bit silently as 12344)
    err = load_error(ckpt, verify_checksums=False)
    assert isinstance(err, ChecksumMismatchError) and "CRC-32 does not match" in str(err) and "'step'" in str(err)
    assert torch.load(io.BytesIO((ckpt / info.relative_path).read_bytes()[info.offset : info.offset + info.length]),
                      weights_only=True) == 12344
    done = run_cli("verify", str(ckpt), "--json")
    (problem,) = json.loads(done.stdout)["problems"]
    assert done.returncode == 1 and problem["keys"] == ["step"] and problem["file"] == info.relative_path


def test_missing_data_file_and_short_file_are_named(tmp_path):
    ckpt = save(tmp_path / "c")
    data = next(ckpt.glob("*_0.distcp"))
    os.truncate(data, data.stat().st_size - 1)
    err = load_error(ckpt)
    assert isinstance(err, ChecksumMismatchError) and f"{data.name} is truncated" in str(err)
    data.unlink()
    err = load_error(ckpt)
    assert isinstance(err, CheckpointIOError) and f"data file '{data.name}'" in str(err) and "is missing" in str(err)


def test_hostile_object_record_cannot_crash_or_inflate_the_loader(tmp_path):
    """An object record whose pickle nests 1M tuples (hashing it would overflow the C stack) or whose
    archive claims a compressed member: refused by name. In a subprocess, since a miss would crash."""
    import zipfile

    ckpt = save(tmp_path / "c")
    info = record_of(ckpt, "step")
    original = (ckpt / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
    names = zipfile.ZipFile(io.BytesIO(original)).namelist()
    deep = b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"Ns."
    variants = {}
    for name, compress in (("deep", zipfile.ZIP_STORED), ("deflated", zipfile.ZIP_DEFLATED)):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=compress) as z:
            for member in names:
                z.writestr(member, deep if member.endswith("data.pkl") else zipfile.ZipFile(io.BytesIO(original)).read(member))
        variants[name] = buffer.getvalue()
    variants["not a zip"] = b"\x80\x02K\x07."
    for name, record in variants.items():
        work = tmp_path / name.replace(" ", "_")
        shutil.copytree(ckpt, work)
        (work / info.relative_path).write_bytes(record)

        def point_at_it(metadata, length=len(record)):
            target = next(i for idx, i in metadata.storage_data.items() if idx.fqn == "step")
            target.offset, target.length = 0, length

        rewrite_metadata(work, point_at_it, reseal=False)
    script = textwrap.dedent(f"""
        import pathlib, torch, torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from dcp_datastates import DataStatesReader
        for name in ("deep", "deflated", "not_a_zip"):
            out = {{"w": torch.zeros(3000), "b": torch.zeros(7, dtype=torch.int64), "step": 0}}
            try:
                dcp.load(out, storage_reader=DataStatesReader(pathlib.Path({str(tmp_path)!r}) / name, verify_checksums=False), no_dist=True)
                print(name, "LOADED")
            except CheckpointException as exc:
                (failure,) = exc.failures.values()
                print(name, type(failure[0]).__name__, str(failure[0])[:160])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert lines["deep"].startswith("CorruptCheckpointError object 'step'") and "100 levels deep" in lines["deep"], lines
    assert lines["deflated"].startswith("CorruptCheckpointError object 'step'") and "compressed" in lines["deflated"], lines
    assert lines["not_a_zip"].startswith("CorruptCheckpointError object 'step'") and "not a torch.save archive" in lines["not_a_zip"]


def _short_str(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def test_allowed_objects_cannot_be_rewritten_process_wide():
    """BUILD (setstate) on a shared object -- an enum member a call returned, a class -- would change it for
    the whole process (torch's own enums, DCP's dataclasses). Refused; the objects stay as they were."""
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import LoadItemType

    from dcp_datastates.safe_pickle import load_metadata_bytes

    planner, metadata = "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint.metadata"
    enum_member = (b"\x80\x04" + _short_str(planner) + _short_str("LoadItemType") + b"\x93K\x01\x85R"
                   + b"}" + _short_str("_name_") + _short_str("EVIL") + b"sb.")
    enum_new = (b"\x80\x04" + _short_str(planner) + _short_str("LoadItemType") + b"\x93K\x01\x85\x81"
                + b"}" + _short_str("_name_") + _short_str("EVIL") + b"sb.")
    a_class = (b"\x80\x04" + _short_str(metadata) + _short_str("Metadata") + b"\x93"
               + b"N}" + _short_str("__repr__") + _short_str(metadata) + _short_str("MetadataIndex") + b"\x93s\x86b.")
    original_name, original_repr = LoadItemType(1)._name_, vars(Metadata).get("__repr__")
    for name, data in {"enum member": enum_member, "enum via NEWOBJ": enum_new, "class": a_class}.items():
        with pytest.raises(CorruptCheckpointError, match=r"is damaged: (it sets the state of an object it did not create|its pickle is malformed)|unpickling failed"):
            load_metadata_bytes(data, "x/.metadata", trust=False)
    assert LoadItemType(1)._name_ == original_name and vars(Metadata).get("__repr__") is original_repr
    try:  # what plain pickle does with the first one: torch's enum member renamed for the whole process
        assert pickle.loads(enum_member) is LoadItemType(1) and LoadItemType(1).name == "EVIL"
    finally:
        LoadItemType(1)._name_ = original_name


class _HugeBytes:
    """Pickles as ``bytes(2**40)``: a terabyte allocated from a number in the file."""

    def __reduce__(self):
        return (bytes, (2**40,))


def test_object_records_allow_plain_bytes_and_frozensets_but_no_allocation_from_a_number(tmp_path):
    state = {"w": torch.arange(4.0), "empty": b"", "raw": b"\x00\xff", "set": frozenset({3, 1})}
    dcp.save(state, storage_writer=DataStatesWriter(tmp_path / "ok", small_config("threads")), no_dist=True)
    out = {"w": torch.zeros(4), "empty": None, "raw": None, "set": None}
    dcp.load(out, storage_reader=DataStatesReader(tmp_path / "ok"), no_dist=True)
    assert out["empty"] == b"" and out["raw"] == b"\x00\xff" and out["set"] == frozenset({1, 3})
    assert torch.equal(out["w"], torch.arange(4.0))

    dcp.save({"w": torch.ones(2), "huge": _HugeBytes()},
             storage_writer=DataStatesWriter(tmp_path / "huge", small_config("threads")), no_dist=True)
    with pytest.raises(CheckpointException) as caught:
        dcp.load({"w": torch.zeros(2), "huge": None}, storage_reader=DataStatesReader(tmp_path / "huge"), no_dist=True)
    (failure,) = caught.value.failures.values()
    assert isinstance(failure[0], UnsafeCheckpointError) and "'huge'" in str(failure[0])
