"""The small model and torchtitan optimizer container both torchtitan driver scripts train."""

from __future__ import annotations

import torch


def tiny_model_and_optimizers(seed: int):
    """A seeded 16 -> 32 -> 4 MLP and torchtitan's ``OptimizersContainer`` (AdamW, lr 1e-2) over it."""
    from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    optimizers = OptimizersContainer(
        OptimizersContainer.Config(
            param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})],
            implementation="for-loop",
        ),
        model_parts=[model],
    )
    return model, optimizers
