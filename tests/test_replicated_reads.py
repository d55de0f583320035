"""Replicated state is read once per job: one rank reads each shared record, the others receive it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from conftest import torchrun_script
from dcp_datastates import DataStatesWriter
from dcp_datastates.shared_reads import assign_shared_reads

HERE = Path(__file__).parent / "multirank"
sys.path.insert(0, str(HERE))
from replicated_load import expected  # noqa: E402

pytestmark = pytest.mark.multirank


def torchrun(*args: str, timeout: int = 300) -> str:
    return torchrun_script("replicated_load.py", *args, timeout=timeout, rerun_teardown_abort=True)  # it only reads


def item(fqn: str) -> ReadItem:
    index = MetadataIndex(fqn, torch.Size([0]))
    return ReadItem(LoadItemType.TENSOR, MetadataIndex(fqn), torch.Size([0]), index, torch.Size([0]), torch.Size([1]))


def test_assignment_stripes_shared_records_and_keeps_private_ones_local():
    storage = {MetadataIndex(f, torch.Size([0])): _StorageInfo("f", o, 100) for o, f in enumerate("abcdefgh")}
    storage = {k: _StorageInfo("f", i * 100, 100) for i, k in enumerate(storage)}
    plans = [LoadPlan([item(f) for f in "abcdefg"]), LoadPlan([item(f) for f in "abcdefh"])]
    shared = assign_shared_reads(plans, storage, batch_bytes=250)
    owners = {index.fqn: batch.owner for batch in shared.batches for index, _, _ in batch.records}
    assert owners == {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1, "f": 1}  # g and h: one rank each, read locally
    assert all(batch.nbytes <= 250 for batch in shared.batches)
    assert [[pos for _, pos, _ in b.records] for b in shared.batches] == [[0, 100], [0], [0, 100], [0]]
    assert assign_shared_reads([LoadPlan([item("a")]), LoadPlan([item("b")])], storage) is None


def test_two_ranks_read_replicated_state_once(tmp_path):
    dcp.save(expected(), storage_writer=DataStatesWriter(tmp_path / "c"), no_dist=True)
    data = sum(p.stat().st_size for p in (tmp_path / "c").iterdir() if p.suffix == ".distcp")
    out = torchrun("load", str(tmp_path / "c"))
    read = {(int(r), p): (int(b), int(rx)) for r, p, b, rx in
            re.findall(r"rank (\d): (\w+) OK bytes_read=(\d+) bytes_received=(\d+)", out)}
    assert len(read) == 6, out
    for rank in (0, 1):
        # every rank reading everything: each reads the whole data (rounded up to whole blocks)
        assert read[(rank, "every_rank")][0] >= data and read[(rank, "every_rank")][1] == 0
        assert read[(rank, "auto")] == read[(rank, "every_rank")]  # one host: auto reads on every rank
        # once: each rank reads about half and receives the rest
        once_read, once_received = read[(rank, "once")]
        assert 0 < once_read <= 0.6 * data + 2 * 1024**2, (rank, once_read, data)
        assert once_received > 0.4 * data
    assert read[(0, "once")][0] + read[(1, "once")][0] <= data + 4 * 1024**2


def test_a_rank_that_fails_reading_for_others_fails_every_rank_without_a_hang(tmp_path):
    dcp.save(expected(), storage_writer=DataStatesWriter(tmp_path / "c"), no_dist=True)
    (data,) = [p for p in (tmp_path / "c").iterdir() if p.name.endswith("_0.distcp")]
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF  # in the last records: the second stripe, read by rank 1
    data.write_bytes(bytes(raw))
    torchrun("corrupt", str(tmp_path / "c"), timeout=240)
    for rank in (0, 1):  # DCP gathers every rank's error into each rank's exception
        line = (tmp_path / f"c.rank{rank}.txt").read_text()
        assert line.startswith(f"rank {rank}: failed: "), line
        assert re.search(r"ChecksumMismatchError: checksum mismatch in \S+ at offset \d+ .* holding .*'rep5'", line), line
        assert "CheckpointIOError: rank 1 failed while reading replicated records for the other ranks" in line, line


def test_a_rank_that_cannot_decode_what_it_received_fails_every_rank_without_a_hang(tmp_path):
    from fractions import Fraction

    dcp.save(expected() | {"frac": Fraction(1, 3)}, storage_writer=DataStatesWriter(tmp_path / "c"), no_dist=True)
    torchrun("refuse", str(tmp_path / "c"), timeout=240)  # objects come last: rank 1 reads, rank 0 refuses
    for rank in (0, 1):
        line = (tmp_path / f"c.rank{rank}.txt").read_text()
        assert line.startswith(f"rank {rank}: failed: "), line
        assert "UnsafeCheckpointError: object 'frac'" in line, line
        assert "CheckpointIOError: rank 0 failed while decoding replicated records it received" in line, line
