"""Native I/O engines: io_uring with O_DIRECT, and thread-pool pwrite/preadv fallbacks.

Installed as ``dcp_datastates.native``. ``create_engine`` picks a write engine from the config,
``create_read_engine`` a read engine.
"""

from dcp_datastates.native.direct_file import OpenedFile, open_for_write
from dcp_datastates.native.engine import EngineUnavailable, WriteEngine, WriteRequest, create_engine
from dcp_datastates.native.read_engine import (
    OpenedReadFile,
    ReadEngine,
    ReadRequest,
    create_read_engine,
    open_for_read,
)

__all__ = ["EngineUnavailable", "OpenedFile", "OpenedReadFile", "ReadEngine", "ReadRequest", "WriteEngine",
           "WriteRequest", "create_engine", "create_read_engine", "open_for_read", "open_for_write"]
