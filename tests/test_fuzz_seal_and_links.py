"""Seeded fuzzing of seal edits and planted links, and ``rm -rf`` at each point of a save.

**Seal edits.** A keyed checkpoint's seal is edited the ways an attacker with write access
would (strip it, empty or alter each field, drop a field, remove or edit the side file, and
-- the forger -- recompute every unkeyed digest over changed data), each with or without a
flipped data byte. Each edited copy is read under ``if-present``, ``required`` and the key.
Asserted: under the key nothing but the untouched checkpoint loads; under ``required`` only
a forgery that recomputed every digest with checksums does (the documented limit of an
unkeyed seal); under ``if-present`` also a stripped seal or one saved without checksums;
every refusal is one of our typed errors naming a file; every load is exact or exactly the
forged bytes; ``verify`` under the key never says verified.

**Planted links.** At each name a save creates (the lock, the tensor data file, the object
file, the checksum side file, the temporary ``.metadata``), at each phase (before the save,
just before the file is created, while the snapshot writes, before the commit), an entry
of a seeded kind (symbolic link to an outside file, dangling link, hard link to an outside
file, FIFO, directory, plain file) is planted. Asserted: a typed error naming the file --
never a hang, never a raw ``OSError`` -- the outside file byte-identical, the planted entry
left as it was, and the previous checkpoint in the directory loading exactly.

Counts per kind are printed (``-s``) for docs/integrity.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import stat
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from conftest import plant, small_config
from dcp_datastates import DataStatesConfig, DataStatesError, DataStatesReader, DataStatesWriter
from dcp_datastates import dir_files
from dcp_datastates import snapshot as snapshot_module
from dcp_datastates import writer as writer_module
from dcp_datastates.checksums import checksums_of, encode_checksum_file, parse_checksum_file
from dcp_datastates.chunk_stream import ChunkedFileStream
from dcp_datastates.dir_files import CheckpointDir
from dcp_datastates.errors import CheckpointDirectoryChangedError
from dcp_datastates.framing import tensor_framing
from dcp_datastates.integrity import KEY_ENV, IntegrityPolicy
from dcp_datastates.metadata_check import INTEGRITY_ATTR, metadata_digest, seal_metadata
from dcp_datastates.save_claim import LOCK_FILE
from dcp_datastates.snapshot import SnapshotResult
from dcp_datastates.verify import VERIFIED, verify_checkpoint

SEED = 20240611
KEY = b"fuzz key: 0123456789abcdef"
ATTACKER_KEY = b"the attacker's own key, 32 bytes"
N = 256
COUNTS: dict[str, Counter] = {}
OUTSIDE = b"a file outside the checkpoint: it must never change\n" * 40


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def tiny(value: float) -> dict:
    return {"w": torch.arange(N, dtype=torch.float32) + value, "step": int(value)}


def load(path: Path, config: DataStatesConfig | None = None) -> dict:
    out = {"w": torch.zeros(N), "step": -1}
    dcp.load(out, storage_reader=DataStatesReader(path, config=config), no_dist=True)
    return out


def is_exactly(state: dict, value: float) -> bool:
    return state["step"] == int(value) and torch.equal(state["w"], tiny(value)["w"])


def unwrap(exc: BaseException) -> BaseException:
    if isinstance(exc, CheckpointException):
        (failure,) = exc.failures.values()
        return failure[0] if isinstance(failure, tuple) else failure
    return exc


def bounded(fn, timeout: float = 60.0):
    """Run ``fn`` on a daemon thread: a hang (a FIFO opened blocking) fails the test instead of hanging it."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - judged by the caller
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} ran past {timeout} s (blocked on a planted entry?)"
    return result


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    keyed, plain = root / "keyed", root / "plain"
    dcp.save(tiny(1.0), storage_writer=DataStatesWriter(keyed, small_config("threads", integrity_key=KEY)), no_dist=True)
    dcp.save(tiny(1.0), storage_writer=DataStatesWriter(plain, small_config("threads")), no_dist=True)
    return {"keyed": keyed, "plain": plain}


# -- seal edits ---------------------------------------------------------------------------------------
def _metadata(path: Path):
    return pickle.loads((path / ".metadata").read_bytes())


def _store(path: Path, metadata) -> None:
    (path / ".metadata").write_bytes(pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL))


def _side(path: Path) -> Path:
    return next(path.glob("__*_checksums.json"))


def _flip(path: Path, rng: random.Random) -> None:
    (info,) = [i for index, i in _metadata(path).storage_data.items() if index.fqn == "w"]
    target = path / info.relative_path
    raw = bytearray(target.read_bytes())
    prefix = len(tensor_framing(torch.float32, (N,)).prefix)  # inside the raw bytes, not their framing
    raw[info.offset + prefix + rng.randrange(4 * N)] ^= 1 << rng.randrange(8)
    target.write_bytes(bytes(raw))


def _recompute_side_file(path: Path) -> None:
    side = _side(path)
    sums = parse_checksum_file(side.read_bytes(), side.name)
    for name, entry in list(sums.items()):
        sums[name] = checksums_of((path / name).read_bytes(), entry.block_bytes)
    side.write_bytes(encode_checksum_file(sums))


#: Seal fields and the alterations tried on each (none recomputes the digest).
ALTERATIONS = {
    "format": [1, 3, "2", None],
    "metadata_sha256": ["0" * 64, "zz", None],
    "checksum_files": ["empty", "drop", "rename", "wrong-sha", "extra"],
    "checksums": [False, "yes"],
    "key_id": ["0" * 16, None, "short"],
    "mac": ["1" * 64, None, 7],
}
#: Edits that recompute every digest an attacker without the key can (their data is changed).
FORGERIES = {"forge-unkeyed", "forge-keep-mac", "forge-attacker-key", "forge-format-1", "forge-no-checksums"}


def edit_seal(path: Path, kind: str, rng: random.Random) -> str:
    """Apply ``kind`` to the checkpoint at ``path``; return the exact edit made (for the counters)."""
    metadata = _metadata(path)
    record = vars(metadata).get(INTEGRITY_ATTR)
    if kind == "strip":
        vars(metadata).pop(INTEGRITY_ATTR)
        _store(path, metadata)
        return kind
    if kind == "remove-side-file":
        _side(path).unlink()
        return kind
    if kind == "edit-side-file":
        side = _side(path)
        raw = bytearray(side.read_bytes())
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(7)
        side.write_bytes(bytes(raw))
        return kind
    if kind == "drop-field":
        field = rng.choice(sorted(record))
        del record[field]
        _store(path, metadata)
        return f"drop-field:{field}"
    if kind == "alter":
        field = rng.choice(sorted(ALTERATIONS))
        value = rng.choice(ALTERATIONS[field])
        if field == "checksum_files":
            (side, sha), = record["checksum_files"].items()
            record["checksum_files"] = {"empty": {}, "drop": {}, "rename": {side.replace("checksums", "checksumz"): sha},
                                        "wrong-sha": {side: "f" * 64}, "extra": {side: sha, "__9_x_checksums.json": sha}}[value]
        else:
            record[field] = value
        _store(path, metadata)
        return f"alter:{field}={value}"
    # the forger: changed data, recomputed block checksums, side-file SHA-256 and digest
    _flip(path, rng)
    _recompute_side_file(path)
    metadata = _metadata(path)
    old = dict(vars(metadata)[INTEGRITY_ATTR])
    if kind == "forge-no-checksums":
        seal_metadata(metadata, path, [], checksums=False)
    elif kind == "forge-attacker-key":
        seal_metadata(metadata, path, old["checksum_files"], key=ATTACKER_KEY)
    elif kind == "forge-format-1":
        vars(metadata).pop(INTEGRITY_ATTR)
        v1 = metadata_digest(metadata)  # format 1 sealed the content only
        side = _side(path)
        vars(metadata)[INTEGRITY_ATTR] = {"format": 1, "metadata_sha256": v1,
                                          "checksum_files": {side.name: hashlib.sha256(side.read_bytes()).hexdigest()}}
    else:
        seal_metadata(metadata, path, old["checksum_files"])
        if kind == "forge-keep-mac":
            record = vars(metadata)[INTEGRITY_ATTR]
            record["key_id"] = old["key_id"]
            record["metadata_sha256"] = metadata_digest(metadata)
            record["mac"] = old["mac"]
    _store(path, metadata)
    return kind


def accepted_under(edit: str) -> set[str]:
    """The policies that load a checkpoint after ``edit`` (no data byte changed outside a forgery)."""
    if edit in ("forge-unkeyed", "forge-keep-mac", "forge-attacker-key"):
        return {"if-present", "required"}  # an unkeyed seal cannot tell a forger from us: only the key can
    if edit in ("forge-format-1", "forge-no-checksums", "strip"):
        return {"if-present"}  # loads unverified (stripped: the side file beside it still verifies the data)
    if edit == "alter:mac=" + "1" * 64:
        return {"if-present", "required"}  # a wrong HMAC is meaningless without the key
    return set()


POLICIES = {"if-present": DataStatesConfig(integrity_key=None), "required": DataStatesConfig(integrity="required", integrity_key=None),
            "key": DataStatesConfig(integrity_key=KEY)}
SEAL_KINDS = ["strip", "remove-side-file", "edit-side-file", "drop-field", "alter", "alter", "alter",
              *sorted(FORGERIES)]
SEAL_CASES = 36


def test_fuzz_seal_edits(pristine, tmp_path):
    rng = random.Random(SEED)
    names = {p.name for p in pristine["keyed"].iterdir()} | {".metadata", "integrity record"}
    for case in range(SEAL_CASES + 1):
        work = tmp_path / f"c{case}"
        shutil.copytree(pristine["keyed"], work)
        if case == 0:
            edit, flipped = "none", False
        else:
            edit = edit_seal(work, rng.choice(SEAL_KINDS), rng)
            flipped = edit not in FORGERIES and rng.random() < 0.4
            if flipped:
                _flip(work, rng)
        forged = edit in FORGERIES
        for policy, config in POLICIES.items():
            try:
                DataStatesReader(work, config=config).read_metadata()  # every check before any planner acts
                state = load(work, config)
            except (CheckpointException, DataStatesError) as exc:
                error = unwrap(exc)
                assert isinstance(error, DataStatesError), (edit, policy, repr(error))
                assert any(name in str(error) for name in names) or str(work) in str(error), (edit, str(error))
                outcome = type(error).__name__
            else:
                outcome = "forged values" if forged else "exact"
                assert is_exactly(state, 1.0) != forged, (edit, policy, "loaded values neither saved nor forged")
            expected = {"if-present", "required", "key"} if edit == "none" else accepted_under(edit)
            loaded = outcome in ("exact", "forged values")
            assert loaded == (policy in expected and not flipped), (edit, flipped, policy, outcome)
            label = edit if forged or edit == "strip" else edit.split(":")[0]
            COUNTS.setdefault(f"seal:{label}:{policy}", Counter())[outcome] += 1
        if case % 3:
            continue  # verify (a whole-file pass per file) on every third case: the rest is the reader's path
        try:
            status = verify_checkpoint(work, policy=IntegrityPolicy(key=KEY)).status
        except DataStatesError as exc:  # a malformed seal: nothing to verify (the CLI exits 1)
            status = type(exc).__name__
        assert (status == VERIFIED) == (edit == "none"), (edit, status)


# -- planted links ------------------------------------------------------------------------------------
def same_kind(path: Path, kind: str) -> bool:
    mode = os.lstat(path).st_mode
    return {"symlink": stat.S_ISLNK, "dangling": stat.S_ISLNK, "fifo": stat.S_ISFIFO, "directory": stat.S_ISDIR}.get(
        kind, stat.S_ISREG)(mode)


#: (name, phase) -> the kinds of entry the generator may plant there.
SCENARIOS = {
    ("lock", "before-save"): ["symlink", "dangling", "hardlink", "fifo", "directory"],
    ("data", "before-create"): ["symlink", "dangling", "hardlink", "fifo", "directory", "file"],
    ("objects", "before-create"): ["symlink", "dangling", "hardlink", "fifo", "file"],
    ("checksums", "before-create"): ["symlink", "dangling", "hardlink", "file"],
    ("temp-metadata", "before-create"): ["symlink", "dangling", "hardlink", "fifo"],
    ("data", "while-writing"): ["symlink", "hardlink", "file"],
    ("data", "before-commit"): ["symlink", "hardlink", "fifo", "directory"],
    ("checksums", "before-commit"): ["symlink", "hardlink", "dangling"],
    ("old-temp-name", "before-commit"): ["symlink"],  # the name earlier versions used: now never touched
}
_PATTERNS = {"data": r"_0\.distcp$", "objects": r"_1\.distcp$", "checksums": r"_checksums\.json$",
             "temp-metadata": r"^\.metadata\..*\.tmp$"}


def _cases() -> list[tuple[str, str, str]]:
    rng = random.Random(SEED + 1)
    cases = [("lock", "before-save", kind) for kind in SCENARIOS[("lock", "before-save")]]
    for (name, phase), kinds in SCENARIOS.items():
        if name != "lock":
            cases += [(name, phase, kind) for kind in rng.sample(kinds, min(2, len(kinds)))]
    return cases


def install_planter(monkeypatch, name: str, phase: str, kind: str, ckpt: Path, outside: Path, planted: list[Path]) -> None:
    def plant_at(entry: Path, move_ours_to: Path | None = None) -> None:
        if move_ours_to is not None:
            os.rename(entry, move_ours_to)
        plant(entry, kind, outside)
        planted.append(entry)

    if phase == "before-save":
        plant_at(ckpt / LOCK_FILE)
    elif phase == "before-create" and name == "data":
        real_open = snapshot_module.open_for_write

        def open_for_write(path, *args, **kwargs):
            plant_at(Path(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(snapshot_module, "open_for_write", open_for_write)
    elif phase == "before-create":
        real_create = CheckpointDir.create

        def create(self, entry, *args, **kwargs):
            if re.search(_PATTERNS[name], entry) and not planted:
                plant_at(self.path / entry)
            return real_create(self, entry, *args, **kwargs)

        monkeypatch.setattr(CheckpointDir, "create", create)
    elif phase == "while-writing":
        real_submit = ChunkedFileStream._checksum_and_submit

        def submit(self, sealed):
            if not planted:
                entry = Path(self._target.path)
                plant_at(entry, move_ours_to=entry.parent.parent / "moved-away")
            return real_submit(self, sealed)

        monkeypatch.setattr(ChunkedFileStream, "_checksum_and_submit", submit)
    else:  # before-commit
        real_commit = writer_module.commit_checkpoint

        def commit(identity, metadata, save_tag, **kwargs):
            if name == "old-temp-name":
                plant_at(ckpt / f".metadata.{save_tag}.tmp")
            else:
                entry = next(p for p in ckpt.iterdir() if save_tag in p.name and re.search(_PATTERNS[name], p.name))
                plant_at(entry, move_ours_to=ckpt.parent / "moved-away")
            return real_commit(identity, metadata, save_tag, **kwargs)

        monkeypatch.setattr(writer_module, "commit_checkpoint", commit)


@pytest.mark.parametrize("name, phase, kind", _cases(), ids=lambda v: str(v))
def test_fuzz_planted_links(pristine, tmp_path, monkeypatch, name, phase, kind):
    ckpt = Path(shutil.copytree(pristine["plain"], tmp_path / "ckpt"))  # the previous checkpoint: value 1
    outside = tmp_path / "outside.bin"
    outside.write_bytes(OUTSIDE)
    planted: list[Path] = []
    install_planter(monkeypatch, name, phase, kind, ckpt, outside, planted)
    writer = DataStatesWriter(ckpt, small_config("threads"), overwrite=True)
    done = bounded(lambda: dcp.async_save(tiny(2.0), storage_writer=writer, no_dist=True).upload_completion.result(60))
    monkeypatch.undo()
    assert outside.read_bytes() == OUTSIDE, "a file outside the checkpoint was written through a planted entry"
    assert planted and all(same_kind(p, kind) for p in planted), "the planted entry was touched"
    if name == "old-temp-name":
        assert "error" not in done, done
        assert is_exactly(load(ckpt), 2.0)
        outcome = "committed (untouched)"
    else:
        error = unwrap(done["error"])
        assert isinstance(error, DataStatesError), repr(error)
        assert planted[0].name in str(error), str(error)
        assert is_exactly(load(ckpt), 1.0)  # the previous checkpoint is intact
        outcome = type(error).__name__
    COUNTS.setdefault(f"link:{name}:{phase}", Counter())[f"{kind}->{outcome}"] += 1


# -- rm -rf at each point of an async save ---------------------------------------------------------------
@pytest.mark.parametrize("point", ["before-snapshot", "before-write-data", "while-creating-side-file", "before-commit"])
def test_rm_rf_right_after_async_save_is_a_typed_error_at_every_point(tmp_path, monkeypatch, point):
    target = tmp_path / "step-2"
    removed = threading.Event()

    def remove() -> None:
        if not removed.is_set():
            removed.set()
            shutil.rmtree(target)

    if point == "before-snapshot":  # the snapshot has not opened a single file yet
        real_run = snapshot_module.Snapshot.run
        monkeypatch.setattr(snapshot_module.Snapshot, "run", lambda self: (remove(), real_run(self))[1])
    elif point == "before-write-data":
        real_write = writer_module.DataStatesWriter.write_data
        monkeypatch.setattr(writer_module.DataStatesWriter, "write_data", lambda self, *a: (remove(), real_write(self, *a))[1])
    elif point == "while-creating-side-file":  # the directory's descriptor is open; the directory is gone
        real_create = CheckpointDir.create
        monkeypatch.setattr(CheckpointDir, "create", lambda self, entry, *a, **k: (
            remove() if entry.endswith("checksums.json") else None, real_create(self, entry, *a, **k))[1])
    else:
        real_commit = writer_module.commit_checkpoint
        monkeypatch.setattr(writer_module, "commit_checkpoint", lambda *a, **k: (remove(), real_commit(*a, **k))[1])
    response = dcp.async_save(tiny(2.0), storage_writer=DataStatesWriter(target, small_config("threads")), no_dist=True)
    done = bounded(lambda: response.upload_completion.result(60))
    assert removed.is_set()
    error = unwrap(done["error"])
    assert isinstance(error, CheckpointDirectoryChangedError), repr(error)
    assert "removed" in str(error) and str(target) in str(error)
    assert not target.exists()  # never created again


# -- dir_files: renames never replace, creation never reuses ------------------------------------------
@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "link-unlink"])
def test_a_rename_never_replaces_what_is_at_the_new_name(tmp_path, monkeypatch, renameat2):
    if not renameat2:
        monkeypatch.setattr(dir_files, "_RENAMEAT2", None)
    (tmp_path / "d").mkdir()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(OUTSIDE)
    with CheckpointDir(os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY), tmp_path / "d") as d:
        d.write_new("__0_aaaa_0.distcp", b"zero", fsync=False)
        d.write_new("__0_aaaa_1.distcp", b"one", fsync=False)
        (tmp_path / "d" / "__0_bbbb_1.distcp").symlink_to(outside)
        with pytest.raises(CheckpointDirectoryChangedError, match="__0_bbbb_1.distcp: something already exists"):
            d.write_new("__0_bbbb_1.distcp", b"x", fsync=False)
        renamed: list[str] = []
        result = SnapshotResult(files=["__0_aaaa_0.distcp", "__0_aaaa_1.distcp"])
        with pytest.raises(CheckpointDirectoryChangedError, match="__0_bbbb_1.distcp"):
            writer_module._rename_to_prefix(d, result, "__0_bbbb_", renamed)
        assert renamed == ["__0_bbbb_0.distcp"] and (tmp_path / "d" / "__0_bbbb_0.distcp").read_bytes() == b"zero"
        assert not (tmp_path / "d" / "__0_aaaa_1.distcp").exists()  # the staged file not renamed was removed
        assert (tmp_path / "d" / "__0_bbbb_1.distcp").is_symlink() and outside.read_bytes() == OUTSIDE
        shutil.rmtree(tmp_path / "d")
        with pytest.raises(CheckpointDirectoryChangedError, match="was removed"):
            d.write_new("late", b"x", fsync=False)


# -- the counters -------------------------------------------------------------------------------------
def test_fuzz_counters_add_up():
    """Runs after the tests above (pytest keeps file order): every kind ran and was judged."""
    if not COUNTS:
        pytest.fail("run this module as a whole: the tests above fill the counters")
    print("\nseal and link fuzz outcomes:", json.dumps({k: dict(v) for k, v in sorted(COUNTS.items())}, indent=1))
    seal = sum(sum(c.values()) for k, c in COUNTS.items() if k.startswith("seal:"))
    links = sum(sum(c.values()) for k, c in COUNTS.items() if k.startswith("link:"))
    assert seal == 3 * (SEAL_CASES + 1) and links == len(_cases()), (seal, links)
    keyed_loads = sum(c[o] for k, c in COUNTS.items() if k.startswith("seal:") and k.endswith(":key")
                      and "none" not in k for o in ("exact", "forged values"))
    assert keyed_loads == 0  # under the key, nothing edited ever loads
    assert {k.split(":")[1] for k in COUNTS if k.startswith("seal:")} >= {"strip", "alter", "drop-field", *FORGERIES}
