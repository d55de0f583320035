"""Whole-checkpoint verification (``dcp-datastates verify``): every byte against its checksum.

Files are read sequentially with O_DIRECT into aligned buffers (so the page cache can
neither flatter nor slow the result), the next chunk is read while the current one is
hashed, and hashing runs in parallel numba kernels far above disk speed: verification
runs at close to the disk's read bandwidth.

The verdict is one of three (``VerifyReport.status``): ``verified`` (every data file
checked against checksums the sealed ``.metadata`` vouches for -- under a key, a seal
whose HMAC verifies), ``unverified`` (no problem found, but not verified end to end: no
seal (stock DCP, or it was removed), ``checksums=False``, files without checksums, or --
under a key -- a seal not made with it; ``unverified_reasons`` says which; sizes are still
checked) and ``damaged`` (anything wrong: a missing, short or altered data file, a missing
or altered checksum file, an altered ``.metadata`` or seal).
"""

from __future__ import annotations

import errno
import heapq
import mmap
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dcp_datastates.checksums import FileChecksums
from dcp_datastates.errors import CorruptCheckpointError
from dcp_datastates.integrity import IntegrityPolicy
from dcp_datastates.metadata_check import (
    data_file_problems,
    load_verified_checksums,
    read_checkpoint_metadata,
    records_by_file,
)

VERIFY_CHUNK_BYTES = 32 * 1024**2


@dataclass
class Corruption:
    file: str
    offset: int
    length: int
    keys: list[str]
    reason: str


VERIFIED, UNVERIFIED, DAMAGED = "verified", "unverified", "damaged"


@dataclass
class VerifyReport:
    path: str
    files_verified: int = 0
    files_unverified: list[str] = field(default_factory=list)  # no checksums (stock DCP, or checksums=False)
    bytes_verified: int = 0
    seconds: float = 0.0
    problems: list[Corruption] = field(default_factory=list)
    saved_with_checksums: bool = False
    sealed: bool = False  # .metadata carries a seal
    keyed: bool = False  # ... whose HMAC verified under the key given
    #: why the checkpoint is not verified end to end (no seal, checksums=False, not sealed with the key, ...)
    unverified_reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        if self.problems:
            return DAMAGED
        return UNVERIFIED if self.files_unverified or self.unverified_reasons else VERIFIED


def _open_for_read(path: Path) -> int:
    """O_DIRECT where the file system allows it (aligned mmap buffers make that legal); a regular file only."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # never through a link or FIFO
    try:
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            fd = os.open(path, flags)
    except OSError as exc:  # ELOOP: a link swapped in after the checks
        kind = "a symbolic link" if exc.errno == errno.ELOOP else f"unreadable ({exc.strerror})"
        raise CorruptCheckpointError(f"data file {path} is {kind}; data files are never read through links") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptCheckpointError(f"data file {path} is not a regular file (it changed after the check)")
    return fd


def _verify_file(path: Path, checksums: FileChecksums, progress: Callable[[int], None]) -> list[int]:
    """Offsets of the blocks whose bytes do not match; reads the file once, prefetching."""
    chunk = VERIFY_CHUNK_BYTES // checksums.block_bytes * checksums.block_bytes or checksums.block_bytes
    buffers = [mmap.mmap(-1, chunk), mmap.mmap(-1, chunk)]
    fd = _open_for_read(path)
    bad: list[int] = []

    def read(i: int, offset: int) -> int:
        return os.preadv(fd, [buffers[i]], offset)

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcp-datastates-verify") as reader:
            pending = reader.submit(read, 0, 0)
            offset, i = 0, 0
            while offset < checksums.size:
                got = pending.result()
                if offset + chunk < checksums.size:
                    pending = reader.submit(read, 1 - i, offset + chunk)
                valid = min(got, checksums.size - offset)
                bad += [b * checksums.block_bytes for b in checksums.bad_blocks(memoryview(buffers[i])[:valid], offset)]
                if valid < min(chunk, checksums.size - offset):  # file shorter than saved
                    bad.append(offset + valid)
                    break
                progress(valid)
                offset += chunk
                i = 1 - i
    finally:
        os.close(fd)
    return bad


def _keys_of_ranges(records: list[tuple[int, int, str]], ranges: list[tuple[int, int]]) -> list[list[str]]:
    """For each ``[start, end)`` of ``ranges`` (ascending), the keys of the ``(offset, length, key)`` records it touches.

    One sweep over records sorted by offset, keeping those still open in a heap by end:
    linear in records and ranges (plus the keys reported), where asking each bad block
    about every record was quadratic for a file of many small records.
    """
    ordered = sorted(records)
    open_records: list[tuple[int, str]] = []
    out: list[list[str]] = []
    j = 0
    for start, end in ranges:
        while j < len(ordered) and ordered[j][0] < end:
            offset, length, key = ordered[j]
            heapq.heappush(open_records, (offset + length, key))
            j += 1
        while open_records and open_records[0][0] <= start:
            heapq.heappop(open_records)
        out.append(sorted({key for _, key in open_records}))
    return out


def planned_bytes(path: str | os.PathLike, *, trust: bool = False, policy: IntegrityPolicy | None = None) -> int:
    """Bytes ``verify_checkpoint`` will hash (for a progress bar); 0 if they cannot be known yet."""
    try:
        metadata = read_checkpoint_metadata(path, trust=trust)
        return sum(fc.size for fc in load_verified_checksums(path, metadata, policy or IntegrityPolicy.default()).files.values())
    except Exception:  # noqa: BLE001 - verify_checkpoint itself reports whatever is wrong
        return 0


def verify_checkpoint(
    path: str | os.PathLike,
    progress: Callable[[int], None] | None = None,
    *,
    trust: bool = False,
    policy: IntegrityPolicy | None = None,
) -> VerifyReport:
    """Check every data file of a checkpoint against the checksums recorded at save time.

    ``policy`` (default: ``IntegrityPolicy.default()``, keyed if ``DCP_DATASTATES_INTEGRITY_KEY``
    is set) decides what counts as verified: with a key, only a seal whose HMAC verifies under it. Raises our typed errors only where there is
    nothing to verify (no such directory, no ``.metadata``, a ``.metadata`` that cannot be
    parsed or is refused as unsafe); every other problem is collected in the report.
    """
    directory = Path(path)
    metadata = read_checkpoint_metadata(directory, trust=trust)
    report = VerifyReport(str(directory))
    step = progress or (lambda n: None)
    start = time.perf_counter()
    checksums = load_verified_checksums(directory, metadata, policy or IntegrityPolicy.default())
    report.saved_with_checksums = checksums.saved_with_checksums
    report.sealed, report.keyed, report.unverified_reasons = checksums.sealed, checksums.keyed, checksums.unverified
    by_file = records_by_file(metadata)
    for problem in checksums.problems + data_file_problems(directory, metadata, checksums.files):
        report.problems.append(Corruption(problem.file, problem.offset, problem.length, problem.keys, problem.reason))
    damaged = {p.file for p in report.problems}
    if checksums.problems:  # without trustworthy checksums, hashing the data proves nothing
        report.seconds = time.perf_counter() - start
        return report
    for name, records in sorted(by_file.items()):
        if name in damaged:
            continue
        expected = checksums.files.get(name)
        if expected is None:
            report.files_unverified.append(name)
            continue
        try:
            bad_offsets = _verify_file(directory / name, expected, step)
        except CorruptCheckpointError as exc:  # swapped for a link or FIFO after the checks
            report.problems.append(Corruption(name, 0, expected.size, sorted({k for _, _, k in records}), str(exc)))
            continue
        bad = [(offset, max(0, min(expected.block_bytes, expected.size - offset))) for offset in bad_offsets]
        for (offset, length), keys in zip(bad, _keys_of_ranges(records, [(o, o + max(n, 1)) for o, n in bad])):
            report.problems.append(Corruption(name, offset, length, keys, "checksum mismatch"))
        report.files_verified += 1
        report.bytes_verified += expected.size
    report.seconds = time.perf_counter() - start
    return report
