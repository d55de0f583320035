"""numba kernels, installed as ``dcp_datastates.kernels``: block checksums of staged host buffers."""

from dcp_datastates.kernels.checksum import block_checksums, xxh64, xxh64_blocks

__all__ = ["block_checksums", "xxh64", "xxh64_blocks"]
