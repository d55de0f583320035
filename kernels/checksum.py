"""Block checksums of staged and read buffers: XXH3-64 (written), XXH64 (older checkpoints, still read).

Why XXH3-64: it is specified byte for byte (any tool can recompute it: ``xxhsum -H3``, the
``xxhash`` package; the tests compare against that reference) and, with the SIMD code of the
reference C library, hashes several times faster than XXH64 -- about 0.02-0.04 CPU-seconds
per GiB on one core, against 0.11 for our XXH64 kernel. On a training node every core is
wanted by something else, so what a checkpoint costs in CPU is what it takes from training.
The C function is the one the ``xxhash`` package is built from, called from a numba kernel
that releases the GIL once per buffer (not once per block); where the package's library
does not export it, the package's own ``xxh3_64_intdigest`` is called per block (same
values, a GIL round trip per block).

Why XXH64 still: checkpoints written before XXH3 name ``"xxh64"`` in their side files and
keep verifying; its numba kernel below is the one they were written with.

Why blocks: a file's bytes are hashed in fixed-size blocks independently, so a reader
verifies only the blocks it reads, and a corrupted byte is located to its block's offset.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numba
import numpy as np
import xxhash

#: Checksum algorithms a side file may name; the writer uses ``XXH3_64``.
XXH64, XXH3_64 = "xxh64", "xxh3_64"
ALGORITHMS = (XXH64, XXH3_64)

_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)


@numba.njit(inline="always")
def _rotl(x: np.uint64, r: int) -> np.uint64:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@numba.njit(inline="always")
def _round(acc: np.uint64, lane: np.uint64) -> np.uint64:
    acc = acc + lane * _P2
    acc = _rotl(acc, 31)
    return acc * _P1


@numba.njit(inline="always")
def _merge(acc: np.uint64, val: np.uint64) -> np.uint64:
    acc = acc ^ _round(np.uint64(0), val)
    return acc * _P1 + _P4


@numba.njit(nogil=True, cache=True)
def xxh64(data: np.ndarray, start: int, length: int, seed: np.uint64) -> np.uint64:
    """XXH64 of ``data[start:start+length]`` (``data`` is uint8)."""
    words = data[start : start + (length // 8) * 8].view(np.uint64)
    n_words = length // 8
    i = 0
    if length >= 32:
        v1 = seed + _P1 + _P2
        v2 = seed + _P2
        v3 = seed
        v4 = seed - _P1
        while i + 4 <= n_words:
            v1 = _round(v1, words[i])
            v2 = _round(v2, words[i + 1])
            v3 = _round(v3, words[i + 2])
            v4 = _round(v4, words[i + 3])
            i += 4
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = seed + _P5
    h = h + np.uint64(length)
    while i < n_words:
        h = h ^ _round(np.uint64(0), words[i])
        h = _rotl(h, 27) * _P1 + _P4
        i += 1
    p = start + n_words * 8
    end = start + length
    if p + 4 <= end:
        k = (
            np.uint64(data[p])
            | (np.uint64(data[p + 1]) << np.uint64(8))
            | (np.uint64(data[p + 2]) << np.uint64(16))
            | (np.uint64(data[p + 3]) << np.uint64(24))
        )
        h = h ^ (k * _P1)
        h = _rotl(h, 23) * _P2 + _P3
        p += 4
    while p < end:
        h = h ^ (np.uint64(data[p]) * _P5)
        h = _rotl(h, 11) * _P1
        p += 1
    h = h ^ (h >> np.uint64(33))
    h = h * _P2
    h = h ^ (h >> np.uint64(29))
    h = h * _P3
    h = h ^ (h >> np.uint64(32))
    return h


@numba.njit(nogil=True, parallel=True, cache=True)
def xxh64_blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    """XXH64 (seed 0) of each ``block_bytes`` block of ``data``; the last block may be short."""
    n = len(data)
    count = (n + block_bytes - 1) // block_bytes
    out = np.empty(count, dtype=np.uint64)
    for b in numba.prange(count):
        start = b * block_bytes
        out[b] = xxh64(data, start, min(block_bytes, n - start), np.uint64(0))
    return out


@numba.njit(nogil=True, cache=True)
def _xxh3_blocks_native(xxh3: Callable[[int, int], int], data: np.ndarray, block_bytes: int) -> np.ndarray:
    """``xxh3(address, length)`` of each ``block_bytes`` block of ``data``, in one GIL-free call."""
    n = len(data)
    count = (n + block_bytes - 1) // block_bytes
    out = np.empty(count, dtype=np.uint64)
    base = data.ctypes.data
    for b in range(count):
        start = b * block_bytes
        out[b] = xxh3(base + start, min(block_bytes, n - start))
    return out


_native_xxh3: "ctypes._CFuncPtr | None | bool" = False  # False: not looked up yet


def _load_native_xxh3() -> "ctypes._CFuncPtr | None":
    """The reference C ``XXH3_64bits`` inside the ``xxhash`` package (SIMD-dispatched where built so), or None.

    Used only after it agrees with the package's public ``xxh3_64_intdigest`` on a sample of
    awkward lengths: a library built otherwise can only fall back, never give other values.
    """
    try:
        from xxhash import _xxhash

        library = ctypes.CDLL(_xxhash.__file__)
    except (ImportError, OSError, AttributeError):
        return None
    sample = np.frombuffer(bytes(range(256)) * 40, dtype=np.uint8)
    for name in ("XXH3_64bits_dispatch", "XXH3_64bits"):
        function = getattr(library, name, None)
        if function is None:
            continue
        function.argtypes, function.restype = (ctypes.c_size_t, ctypes.c_size_t), ctypes.c_uint64
        lengths = (0, 1, 3, 16, 17, 128, 129, 240, 241, 1024, len(sample) - 7)
        if all(function(sample.ctypes.data + 7, n) == xxhash.xxh3_64_intdigest(sample[7 : 7 + n].tobytes()) for n in lengths):
            return function
    return None


def xxh3_blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    """XXH3-64 (seed 0) of each ``block_bytes`` block of ``data`` (uint8, contiguous); the last block may be short."""
    global _native_xxh3
    if _native_xxh3 is False:
        _native_xxh3 = _load_native_xxh3()
    data = np.ascontiguousarray(data)
    if _native_xxh3 is not None:
        return _xxh3_blocks_native(_native_xxh3, data, block_bytes)
    view = memoryview(data)
    return np.array([xxhash.xxh3_64_intdigest(view[i : i + block_bytes]) for i in range(0, len(data), block_bytes)],
                    dtype=np.uint64)


def block_checksums(
    buffer: memoryview | bytes | bytearray | np.ndarray, block_bytes: int, algorithm: str = XXH3_64
) -> list[int]:
    """Python entry point: checksums of ``buffer`` in blocks, as plain ints (JSON-friendly)."""
    array = np.frombuffer(buffer, dtype=np.uint8) if not isinstance(buffer, np.ndarray) else buffer
    if len(array) == 0:
        return []
    if algorithm == XXH3_64:
        return xxh3_blocks(array, block_bytes).tolist()
    if algorithm == XXH64:
        return xxh64_blocks(array, block_bytes).tolist()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
