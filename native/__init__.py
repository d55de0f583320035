"""Native I/O engines: io_uring with O_DIRECT, and a thread-pool pwrite fallback.

Installed as ``dcp_datastates.native``. ``create_engine`` picks one from the config.
"""

from dcp_datastates.native.direct_file import OpenedFile, open_for_write
from dcp_datastates.native.engine import EngineUnavailable, WriteEngine, WriteRequest, create_engine

__all__ = ["EngineUnavailable", "OpenedFile", "WriteEngine", "WriteRequest", "create_engine", "open_for_write"]
