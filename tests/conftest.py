"""Shared fixtures: every save-path test runs against both write engines."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from dcp_datastates import DataStatesConfig, DataStatesWriter

# Single-process DCP calls warn that torch.distributed is not initialized; that is the point here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

ENGINES = ["threads", "io_uring"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests skip, saying why, where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `python -m pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def small_config(engine: str, **overrides: object) -> DataStatesConfig:
    """Tiny chunks so that even small test states cross many buffer boundaries."""
    fields = {"io_engine": engine, "chunk_bytes": 8192, "host_pool_bytes": 4 * 8192} | overrides
    return DataStatesConfig(**fields)


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_writer(engine: str):
    def _make(path: Path | str, overwrite: bool = False, **overrides: object) -> DataStatesWriter:
        return DataStatesWriter(path, small_config(engine, **overrides), overwrite=overwrite)

    return _make


def sample_state() -> dict:
    """Tensors of every kind the issue names, plus non-tensor training state."""
    g = torch.Generator().manual_seed(1234)
    model = torch.nn.Linear(7, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    return {
        "f32": torch.randn(33, 17, generator=g),
        "bf16": torch.randn(129, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (5, 3, 2), generator=g),
        "scalar": torch.tensor(2.718281828),
        "empty": torch.empty(0, 4),
        "flags": torch.rand(11, generator=g) > 0.5,
        "transposed": torch.randn(6, 9, generator=g).t(),  # non-contiguous
        "big": torch.randn(40_000, generator=g),  # crosses several 8 KiB staging buffers
        "step": 42,
        "nested": {"name": "run-7", "lrs": [0.1, 0.05], "inner": {"t": torch.arange(6)}},
        "scheduler": scheduler.state_dict(),
    }


def zeros_like_state(state: dict) -> dict:
    """A destination with the same structure, every tensor zeroed and every object blanked."""
    out: dict = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.zeros_like(value.contiguous())
        elif isinstance(value, dict):
            out[key] = zeros_like_state(value)
        else:
            out[key] = None
    return out


def assert_state_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[key].dtype == value.dtype, key
            assert actual[key].shape == value.shape, key
            assert torch.equal(actual[key], value), key
        elif isinstance(value, dict):
            assert_state_equal(actual[key], value)
        else:
            assert actual[key] == value, key
