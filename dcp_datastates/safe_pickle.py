"""Loading pickled checkpoint content without running code from the file.

A DCP checkpoint holds two kinds of pickles: ``.metadata`` (DCP's own dataclasses) and
one pickle per non-tensor object of the state dict. Stock DCP unpickles both with no
restriction, so a planted ``__reduce__`` runs arbitrary code at load time. We load
``.metadata`` through an allowlist of DCP's metadata types, and check every object
record with ``torch.load(weights_only=True)`` before any planner unpickles it; trusting
a checkpoint's other content is an explicit opt-in (``trust_checkpoint=True``).
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import torch

from dcp_datastates.errors import UnsafeCheckpointError

_ALLOWED: dict[str, set[str] | None] = {  # None: every name in the module
    "torch.distributed.checkpoint.metadata": None,
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "complex", "slice"},
}

_TRUST_HINT = (
    "If you trust where this checkpoint came from, load it with DataStatesReader(path, trust_checkpoint=True)."
)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(module, set())
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if is_dtype or (module in _ALLOWED and (allowed is None or name in allowed)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f".metadata refers to {module}.{name}, which is not a DCP metadata type; refusing to unpickle it "
            f"(it could run code). {_TRUST_HINT}"
        )


def load_metadata(stream: IO[bytes], trust: bool) -> Any:
    return pickle.load(stream) if trust else _MetadataUnpickler(stream).load()


def check_object_record(payload: bytes | memoryview, key: str, relative_path: str, offset: int) -> None:
    """Raise unless the object record unpickles with ``torch.load(weights_only=True)``."""
    try:
        torch.load(io.BytesIO(payload), weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"object {key!r} ({relative_path} at offset {offset}) is a pickle that safe loading refuses: "
            f"{first_line}. {_TRUST_HINT}"
        ) from exc
