"""Multi-level checkpoints, the partner copy: a rank's files travel to a rank on the next node.

Node *i*'s ranks send their files to the ranks of equal local rank on node *i + 1*
(cyclically) and receive node *i - 1*'s, over the tier worker's gloo group -- the job's
own ``torch.distributed``, no other transport. Both sides know every file and its size
from the save's agreement (``tier_save``), so no header travels: the files are cut into
chunks of at most :data:`CHUNK_BYTES`, and step *k* posts the receive of incoming chunk
*k* and the send of outgoing chunk *k*, then waits for both (a ring of sends never
blocks on itself). Received files are written under a new temporary name (``tier_files.NewFile``:
never through a planted link), fsynced and renamed;
``.metadata`` of the partner copy is published later by the tier worker, only once every
rank agreed that its copy arrived (``tier_runtime``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dcp_datastates.tier_files import NewFile, open_source, remove_files, write_at

#: Largest piece in flight per direction: bounds the worker's memory (two buffers of it).
CHUNK_BYTES = 16 * 1024**2


@dataclass(frozen=True)
class Piece:
    path: Path
    offset: int
    length: int


def pieces(files: list[tuple[Path, int]], chunk: int | None = None) -> list[Piece]:
    chunk = chunk or CHUNK_BYTES
    out = []
    for path, size in files:
        out.extend(Piece(path, offset, min(chunk, size - offset)) for offset in range(0, size, chunk))
    return out


def write_piece(fd: int, data: memoryview, offset: int) -> None:
    """Write one received piece (its own function: the crash tests stop a process right here)."""
    write_at(fd, data, offset)


def exchange(group: Any, send_to: int, outgoing: list[tuple[Path, int]], recv_from: int,
             incoming: list[tuple[Path, int]], *, fsync: bool) -> tuple[int, OSError | None]:
    """Send ``outgoing`` files to ``send_to`` while receiving ``incoming`` from ``recv_from``.

    ``incoming`` paths are where the received files go (written as ``.part``, renamed when whole).
    Returns the bytes received and the first local error. A local error (a file that cannot be
    read, a full disk) does not stop the exchange -- zeros go out instead, pieces that cannot be
    written are dropped -- so the partner never waits for a piece that does not come; the tier
    worker's agreement afterwards makes every rank learn that this copy failed.
    """
    out_pieces, in_pieces = pieces(outgoing), pieces(incoming)
    files: dict[Path, NewFile] = {}
    error: OSError | None = None
    received = 0
    try:
        try:
            for path, _ in incoming:  # every incoming file exists, the empty ones too
                files[path] = NewFile(path.parent, path.name)
        except OSError as exc:
            error = exc
        for k in range(max(len(out_pieces), len(in_pieces))):
            requests = []
            inbox = None
            if k < len(in_pieces):
                inbox = torch.empty(in_pieces[k].length, dtype=torch.uint8)
                requests.append(dist.irecv(inbox, src=recv_from, group=group))
            if k < len(out_pieces):
                piece = out_pieces[k]
                outbox = torch.zeros(piece.length, dtype=torch.uint8)
                if error is None:
                    try:
                        outbox = torch.frombuffer(bytearray(read_piece(piece)), dtype=torch.uint8)
                    except OSError as exc:
                        error = exc
                requests.append(dist.isend(outbox, dst=send_to, group=group))
            for request in requests:
                request.wait()
            if inbox is not None and error is None:
                piece = in_pieces[k]
                try:
                    write_piece(files[piece.path].fd, memoryview(inbox.numpy()), piece.offset)
                    received += piece.length
                except OSError as exc:
                    error = exc
        if error is None:
            try:
                for new in files.values():
                    new.publish(fsync=fsync)
            except OSError as exc:
                error = exc
        return received, error
    finally:
        for new in files.values():
            new.close()
        if error is not None:  # files of this exchange already renamed into place go too
            for path, _ in incoming:
                remove_files(path.parent, [path.name])


def read_piece(piece: Piece) -> bytes:
    """One outgoing piece, read from the regular file it names (never through a link)."""
    fd = open_source(piece.path)
    try:
        data = os.pread(fd, piece.length, piece.offset)
    finally:
        os.close(fd)
    if len(data) != piece.length:
        raise OSError(f"{piece.path} shrank while being sent to its partner "
                      f"(wanted {piece.length} bytes at {piece.offset}, got {len(data)})")
    return data
