"""The state every multi-rank test saves and checks: full tensors are rebuilt from a seed on every rank."""

from __future__ import annotations

import torch


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2026)
    return {
        "f32": torch.randn(8, 6, generator=g),
        "bf16": torch.randn(10, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**50), 2**50, (4, 5), generator=g),
        "grid_a": torch.randn(6, 8, generator=g),  # 2-D mesh (2, 1)
        "grid_b": torch.randn(6, 8, generator=g),  # 2-D mesh (1, 2)
        "scalar": torch.tensor(-3.25),  # 0-d, replicated
    }


def objects() -> dict:
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    return {"step": 1234, "run": {"name": "llama-tiny", "tags": ["a", "b"], "cfg": {"seq": 128}}, "sched": scheduler.state_dict()}


def object_placeholders() -> dict:
    return {"step": 0, "run": {"name": None, "tags": None, "cfg": {"seq": None}}, "sched": {k: None for k in objects()["sched"]}}
