"""Save and load planners that pair with the DataStates storage writer and reader.

``DataStatesSavePlanner`` is DCP's default planner (flattening, dedup of replicated
tensors, DTensor handling) plus the State Providers that decide how a rank's items
are grouped and laid out. ``DataStatesWriter`` also works with a stock planner: it
then uses the default providers.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import LoadPlan, SavePlanner, WriteItem

from dcp_datastates.errors import MissingKeysError
from dcp_datastates.layout import RankLayout, build_rank_layout
from dcp_datastates.state_providers import StateProvider, assign_to_providers, default_providers


class DataStatesSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, with State Providers laying out each rank's data."""

    def __init__(self, *args: Any, state_providers: list[StateProvider] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state_providers = state_providers if state_providers is not None else default_providers()

    def plan_layout(self, items: list[WriteItem], file_prefix: str) -> RankLayout:
        groups = assign_to_providers(items, getattr(self, "state_dict", {}), self.state_providers)
        return build_rank_layout(groups, file_prefix)


def plan_layout(planner: SavePlanner, items: list[WriteItem], file_prefix: str) -> RankLayout:
    """Layout from the planner's providers, or the default providers for a stock planner."""
    if isinstance(planner, DataStatesSavePlanner):
        return planner.plan_layout(items, file_prefix)
    groups = assign_to_providers(items, getattr(planner, "state_dict", {}), default_providers())
    return build_rank_layout(groups, file_prefix)


class DataStatesLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reporting *every* missing key at once.

    The stock planner stops at the first key it cannot find; resuming a job after a
    model change usually misses many, and one round trip per key wastes a user's day.
    """

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        if not self.allow_partial_load:
            stored = set(self.metadata.state_dict_metadata)
            missing = sorted(k for k in self.state_dict if k not in stored)
            if missing:
                shown = ", ".join(repr(k) for k in missing[:20])
                more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
                raise MissingKeysError(
                    f"{len(missing)} key(s) of the state dict are not in the checkpoint: {shown}{more}. "
                    "Load with DataStatesLoadPlanner(allow_partial_load=True) to skip them, or check "
                    "that the checkpoint matches this model."
                )
        return super().create_local_plan()
