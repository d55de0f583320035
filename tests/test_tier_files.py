"""Multi-level tier copies never write through planted links, never reuse an entry, never prune outside their root.

The shared path (and, on a shared node, the local tier) may be writable by others: every
file a tier copy creates -- the drained shared files, partner copies, fetched files, the
manifest -- goes through ``tier_files.NewFile`` (an unpredictable temporary name created
with ``O_EXCL|O_NOFOLLOW``, renamed over the entry at its name without following it);
sources are opened without following links; pruning and stock-taking see real
directories only. Each case plants an entry and checks the file outside is untouched and
the copy is exactly right (or refused with our typed error).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from dcp_datastates import drain, tier_files
from dcp_datastates.errors import CheckpointDirectoryChangedError
from dcp_datastates.tier_files import NewFile, Pin, copy_file, prune, step_directories, write_durably
from dcp_datastates.tier_runtime import flush_tiers, shutdown_tiers
from dcp_datastates.tiers import NODE_ENV

from conftest import plant
from test_multilevel import assert_loads, async_save, ml_config

OUTSIDE = b"a file outside every checkpoint\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside.bin"
    path.write_bytes(OUTSIDE)
    return path


KINDS = ["symlink", "dangling", "hardlink", "fifo", "file"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_copy_replaces_an_entry_planted_at_its_name_without_writing_through_it(tmp_path, outside, kind):
    source, target_dir = tmp_path / "source.bin", tmp_path / "shared"
    source.write_bytes(b"checkpoint bytes" * 1000)
    target_dir.mkdir()
    plant(target_dir / "data.distcp", kind, outside)
    assert copy_file(source, target_dir / "data.distcp", fsync=True) == 16000
    assert outside.read_bytes() == OUTSIDE and os.stat(outside).st_nlink == 1  # a planted hard link is unlinked, not written
    info = os.lstat(target_dir / "data.distcp")
    assert stat.S_ISREG(info.st_mode) and info.st_nlink == 1
    assert (target_dir / "data.distcp").read_bytes() == source.read_bytes()
    assert sorted(p.name for p in target_dir.iterdir()) == ["data.distcp"]  # no temporary file left


@pytest.mark.parametrize("kind", KINDS)
def test_an_entry_planted_at_the_temporary_name_is_refused_and_never_written_through(tmp_path, outside, kind, monkeypatch):
    """The temporary name is unpredictable; forced to be known here, the planted entry still wins nothing."""
    monkeypatch.setattr(tier_files.secrets, "token_hex", lambda n: "0" * (2 * n))
    source, target_dir = tmp_path / "source.bin", tmp_path / "shared"
    source.write_bytes(b"x" * 5000)
    target_dir.mkdir()
    plant(target_dir / f"data.distcp.{'0' * 16}.part", kind, outside)
    with pytest.raises(CheckpointDirectoryChangedError, match="already exists at that name"):
        copy_file(source, target_dir / "data.distcp", fsync=False)
    assert outside.read_bytes() == OUTSIDE and not (target_dir / "data.distcp").exists()


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_source_that_is_a_link_or_fifo_is_refused_naming_it(tmp_path, outside, kind):
    (tmp_path / "shared").mkdir()
    plant(tmp_path / "source.bin", kind, outside)
    with pytest.raises(CheckpointDirectoryChangedError, match="source.bin is not a regular file"):
        copy_file(tmp_path / "source.bin", tmp_path / "shared" / "data.distcp", fsync=False)
    assert list((tmp_path / "shared").iterdir()) == []


def test_the_manifest_is_replaced_not_written_through_and_temporaries_are_unpredictable(tmp_path, outside):
    plant(tmp_path / ".tier.json", "symlink", outside)
    plant(tmp_path / ".tier.json.tmp", "symlink", outside)  # the name an older version used
    write_durably(tmp_path, ".tier.json", b'{"format": 1}', fsync=True)
    assert outside.read_bytes() == OUTSIDE
    assert not (tmp_path / ".tier.json").is_symlink() and (tmp_path / ".tier.json").read_bytes() == b'{"format": 1}'
    names = set()
    for _ in range(20):
        with NewFile(tmp_path, "x") as new:
            names.add(new.tmp)
    assert len(names) == 20 and sorted(p.name for p in tmp_path.iterdir()) == [".tier.json", ".tier.json.tmp", "outside.bin"]


def test_an_unpublished_new_file_is_removed(tmp_path):
    with NewFile(tmp_path, "data.distcp") as new:
        os.write(new.fd, b"half")
    assert list(tmp_path.iterdir()) == []


def test_pruning_never_follows_a_step_link_out_of_the_tier(tmp_path, outside):
    root, elsewhere = tmp_path / "local", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / ".metadata").write_bytes(b"someone else's checkpoint")
    (root / "step-1").symlink_to(elsewhere, target_is_directory=True)
    for step in (2, 3, 4):
        (root / f"step-{step}").mkdir()
        (root / f"step-{step}" / ".metadata").write_bytes(b"m")
    assert [p.name for p in step_directories(root)] == ["step-4", "step-3", "step-2"]
    assert prune(root, 1, fsync=False) == ["step-3", "step-2"]
    assert (elsewhere / ".metadata").read_bytes() == b"someone else's checkpoint"
    assert sorted(p.name for p in elsewhere.iterdir()) == [".metadata"]  # no pin file made in there either
    assert (root / "step-1").is_symlink() and (root / "step-4" / ".metadata").is_file()


def test_a_pin_file_planted_as_a_link_is_refused(tmp_path, outside):
    plant(tmp_path / tier_files.PIN_FILE, "symlink", outside)
    with pytest.raises(CheckpointDirectoryChangedError, match="not a regular file"):
        Pin(tmp_path)
    assert outside.read_bytes() == OUTSIDE


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "file"])
def test_a_drain_over_entries_planted_in_the_shared_directory_publishes_exact_bytes(tmp_path, outside, kind, monkeypatch):
    """Entries planted at every name the drain writes, right before it writes it: outside stays, the copy loads."""
    monkeypatch.setenv(NODE_ENV, "solo")
    real, planted = drain.copy_one, []

    def copy(source: Path, target: Path, fsync: bool) -> int:
        plant(target, kind, outside)
        planted.append(target.name)
        return real(source, target, fsync)

    monkeypatch.setattr(drain, "copy_one", copy)
    try:
        async_save(tmp_path, 1, ml_config(tmp_path))
        assert flush_tiers(60)
    finally:
        assert shutdown_tiers(60)
    assert planted and outside.read_bytes() == OUTSIDE
    shared = tmp_path / "shared/step-1"
    for name in planted:
        info = os.lstat(shared / name)
        assert stat.S_ISREG(info.st_mode) and info.st_nlink == 1
        assert (shared / name).read_bytes() == (tmp_path / "local/solo/step-1" / name).read_bytes()
    assert_loads(shared, 1)


def test_a_drain_whose_local_source_became_a_link_publishes_nothing(tmp_path, outside, monkeypatch, caplog):
    monkeypatch.setenv(NODE_ENV, "solo")
    real = drain.copy_one

    def copy(source: Path, target: Path, fsync: bool) -> int:
        source.unlink()
        plant(source, "symlink", outside)
        return real(source, target, fsync)

    monkeypatch.setattr(drain, "copy_one", copy)
    try:
        with caplog.at_level(logging.WARNING, logger="dcp_datastates"):
            async_save(tmp_path, 1, ml_config(tmp_path))
            assert flush_tiers(60)
    finally:
        assert shutdown_tiers(60)
    assert "is not a regular file" in caplog.text
    shared = tmp_path / "shared/step-1"
    assert not (shared / ".metadata").exists() and not any(shared.glob("__*"))  # no checkpoint, no leftovers
    assert outside.read_bytes() == OUTSIDE


def test_a_copy_directory_that_is_a_link_is_refused(tmp_path, outside):
    from dcp_datastates.tier_files import make_copy_dir

    (tmp_path / "partner").mkdir()
    (tmp_path / "partner" / "step-3").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(CheckpointDirectoryChangedError, match="is a link"):
        make_copy_dir(tmp_path / "partner" / "step-3")
    make_copy_dir(tmp_path / "partner" / "step-4")  # a new real one is made, parents too
    make_copy_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "elsewhere").iterdir()) == []


def test_a_committed_copy_removes_what_killed_copies_left_and_nothing_else(tmp_path, outside):
    from dcp_datastates.tier_files import remove_stale_temporaries

    left = ["data.distcp.0123456789abcdef.part", "data.distcp.fedcba9876543210.part"]
    for name in left:
        (tmp_path / name).write_bytes(b"half a file")
    kept = ["other.distcp.0123456789abcdef.part", "data.distcp.part", "data.distcp.0123.part", "data.distcp"]
    for name in kept:
        (tmp_path / name).write_bytes(b"not ours to remove")
    plant(tmp_path / "data.distcp.aaaaaaaaaaaaaaaa.part", "symlink", outside)
    plant(tmp_path / "data.distcp.bbbbbbbbbbbbbbbb.part", "hardlink", outside)
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(left + ["other.distcp.0123456789abcdef.part"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        kept[1:] + ["data.distcp.aaaaaaaaaaaaaaaa.part", "data.distcp.bbbbbbbbbbbbbbbb.part", "outside.bin"])
    assert outside.read_bytes() == OUTSIDE


def test_a_drain_killed_mid_file_leaves_a_temporary_the_next_committed_drain_of_the_step_removes(tmp_path, monkeypatch):
    monkeypatch.setenv(NODE_ENV, "solo")
    real = drain.copy_one

    def copy_then_fail(source: Path, target: Path, fsync: bool) -> int:
        # what a killed drain leaves: a temporary file under the name NewFile would give it
        (target.parent / f"{target.name}.{'c' * 16}.part").write_bytes(source.read_bytes()[:100])
        raise OSError("the drain died here")

    monkeypatch.setattr(drain, "copy_one", copy_then_fail)
    try:
        async_save(tmp_path, 1, ml_config(tmp_path))
        assert flush_tiers(60)
        shared = tmp_path / "shared/step-1"
        assert not (shared / ".metadata").exists() and any(p.name.endswith(".part") for p in shared.iterdir())
        monkeypatch.setattr(drain, "copy_one", real)
        async_save(tmp_path, 1, ml_config(tmp_path))  # the job saves step 1 again after its restart
        assert flush_tiers(60)
    finally:
        assert shutdown_tiers(60)
    assert not any(p.name.endswith(".part") for p in shared.iterdir())
    assert_loads(shared, 1)


def test_cleanup_removes_only_its_own_files(tmp_path, outside):
    from dcp_datastates.tier_files import remove_files

    new = NewFile(tmp_path, "data.distcp")
    os.rename(tmp_path / new.tmp, tmp_path / "moved")  # someone takes our temporary file away ...
    (tmp_path / new.tmp).write_bytes(b"someone else's")  # ... and puts theirs under its name
    new.close()
    assert (tmp_path / new.tmp).read_bytes() == b"someone else's"  # an unpublished file's cleanup left it
    plant(tmp_path / "linked.distcp", "hardlink", outside)
    (tmp_path / "mine.distcp").write_bytes(b"ours")
    remove_files(tmp_path, ["linked.distcp", "mine.distcp"])
    assert (tmp_path / "linked.distcp").exists() and not (tmp_path / "mine.distcp").exists()
    assert outside.read_bytes() == OUTSIDE
