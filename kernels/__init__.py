"""numba kernels, installed as ``dcp_datastates.kernels``: block checksums of staged host buffers."""

from dcp_datastates.kernels.checksum import (
    ALGORITHMS,
    XXH3_64,
    XXH64,
    block_checksums,
    xxh3_blocks,
    xxh64,
    xxh64_blocks,
)

__all__ = ["ALGORITHMS", "XXH3_64", "XXH64", "block_checksums", "xxh3_blocks", "xxh64", "xxh64_blocks"]
