"""What the conformance scenarios save and check: shared by ``test_conformance.py`` and its torchrun script.

Every scenario runs once with stock storage (``FileSystemWriter``/``FileSystemReader``) and
once with ours (``DataStatesWriter``/``DataStatesReader``), with the same assertions.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import warnings

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.stateful import Stateful

from dcp_datastates import DataStatesReader, DataStatesWriter

SIDES = ("stock", "ours")

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")


def writer(side: str, path: str | Path, **kwargs: Any):
    """The side's storage writer, with stock ``FileSystemWriter``'s arguments (ours accepts them too)."""
    return (FileSystemWriter if side == "stock" else DataStatesWriter)(path, **kwargs)


def reader(side: str, path: str | Path, **kwargs: Any):
    return (FileSystemReader if side == "stock" else DataStatesReader)(path, **kwargs)


def staged(response: Any) -> None:
    """Wait until an ``async_save`` no longer reads the live state (DCP's contract before the next step)."""
    if not isinstance(response, Future):
        response.staging_completion.result()


def finished(response: Any) -> None:
    """Wait for an ``async_save`` to be committed: a Future (stock's own staging) or an AsyncSaveResponse."""
    (response if isinstance(response, Future) else response.upload_completion).result()


def losses_blob(losses: list[float]) -> io.BytesIO:
    """What a trainer typically stores: ``torch.save`` of its own data into a BytesIO."""
    blob = io.BytesIO()
    torch.save(losses, blob)
    return blob


class TrainState(Stateful):
    """A trainer's own state: a step counter (tensor) and the loss history as a ``torch.save`` blob."""

    def __init__(self, step: int = 0, losses: list[float] | None = None) -> None:
        self.step = step
        self.losses = list(losses or [])
        self.loaded_blob: io.BytesIO | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step), "losses": losses_blob(self.losses)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        blob = state_dict["losses"]
        assert type(blob) is io.BytesIO, f"losses came back as {type(blob).__name__}, not io.BytesIO"
        self.loaded_blob = blob
        self.step = int(state_dict["step"])
        blob.seek(0)
        self.losses = torch.load(blob, weights_only=True)  # reading the bytes is the user's call, as with stock


def full_tensors() -> dict[str, torch.Tensor]:
    """The logical tensors every multi-rank scenario shards; rebuilt from a seed on every rank."""
    g = torch.Generator().manual_seed(7)
    return {"w": torch.randn(8, 6, generator=g), "b": torch.randn(8, generator=g).to(torch.bfloat16),
            "i": torch.randint(-(2**40), 2**40, (4, 4), generator=g)}


def quantized() -> dict[str, torch.Tensor]:
    """Quantized tensors (per tensor and per channel): our framing cannot hold them, stock saves them."""
    g = torch.Generator().manual_seed(11)
    q8 = torch.quantize_per_tensor(torch.randn(4, 3, generator=g), 0.1, 2, torch.qint8)
    return {
        "q8": q8,
        "qrows": q8[1:3],  # a view into a larger storage: saved as a tensor of its own
        "qc": torch.quantize_per_channel(
            torch.randn(3, 5, generator=g), torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64),
            torch.tensor([0, 1, -1]), 0, torch.qint8,
        ),
    }


def quantized_targets() -> dict[str, torch.Tensor]:
    """Load destinations: zeros under the saved tensors' quantizers (DCP copies into the destination in place)."""
    targets = {}
    for key, q in quantized().items():
        zeros = torch.zeros(q.shape)
        if q.qscheme() == torch.per_tensor_affine:
            targets[key] = torch.quantize_per_tensor(zeros, q.q_scale(), q.q_zero_point(), q.dtype)
        else:
            targets[key] = torch.quantize_per_channel(
                zeros, q.q_per_channel_scales(), q.q_per_channel_zero_points(), q.q_per_channel_axis(), q.dtype
            )
    return targets


def assert_same(actual: Any, expected: Any, what: str = "") -> None:
    """Exact equality of nested state: tensors (dtype, shape, values, quantizer), BytesIO (type, bytes, position)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{what}: {type(actual).__name__}, not a tensor"
        if hasattr(actual, "full_tensor"):
            actual = actual.full_tensor()
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{what}: {actual.dtype}{tuple(actual.shape)}"
        if expected.is_quantized:
            assert actual.qscheme() == expected.qscheme(), what
            assert torch.equal(actual.int_repr(), expected.int_repr()), f"{what}: stored integers differ"
            assert torch.equal(actual.dequantize(), expected.dequantize()), f"{what}: quantizer differs"
        else:
            assert torch.equal(actual, expected), f"{what}: values differ"
    elif isinstance(expected, io.BytesIO):
        assert type(actual) is io.BytesIO, f"{what}: {type(actual).__name__}, not io.BytesIO"
        assert actual.getvalue() == expected.getvalue() and actual.tell() == expected.tell(), what
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and set(actual) == set(expected), f"{what}: keys {sorted(actual)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{what}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{what}: {actual!r}"
        for k, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{what}[{k}]")
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"
