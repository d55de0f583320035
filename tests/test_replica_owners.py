"""The coordinator's owner rule for replicated items (``replicas.assign_owners``), case by case.

DCP's dedup keeps each replicated item on the rank with the smallest plan; that rank may
have skipped the item (another replica writes it) or may merely hold it while another
rank has already written it. Owners must be ranks that staged the item, else the
checkpoint misses it (or writes it twice).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.planner_helpers import _create_write_item_for_tensor

from dcp_datastates.replicas import OwnerlessItemError, StagedItems, assign_owners


def item(name: str, n: int = 4):
    return _create_write_item_for_tensor(name, torch.zeros(n))


def index(name: str) -> MetadataIndex:
    return item(name).index


def owners(plans, reports) -> dict[str, int]:
    return {i.index.fqn: rank for rank, items in enumerate(assign_owners(plans, reports)) for i in items}


def test_an_item_dcp_gave_to_a_rank_that_skipped_it_goes_to_the_rank_that_wrote_it():
    plans = [SavePlan([item("a")]), SavePlan([item("rep")])]  # DCP chose rank 1 for "rep"
    reports = [StagedItems(frozenset({index("a"), index("rep")}), frozenset()), StagedItems(frozenset(), frozenset())]
    assert owners(plans, reports) == {"a": 0, "rep": 0}


def test_an_item_already_written_stays_with_its_writer_even_if_another_rank_holds_it():
    plans = [SavePlan([]), SavePlan([item("w")])]
    reports = [StagedItems(frozenset({index("w")}), frozenset()), StagedItems(frozenset(), frozenset({index("w")}))]
    assert owners(plans, reports) == {"w": 0}


def test_held_items_keep_dcps_balanced_choice():
    plans = [SavePlan([item("x"), item("y")]), SavePlan([item("z")])]
    held = frozenset({index("x"), index("y"), index("z")})
    reports = [StagedItems(frozenset(), held), StagedItems(frozenset(), held)]
    assert owners(plans, reports) == {"x": 0, "y": 0, "z": 1}


def test_an_item_dcp_gave_to_a_non_holder_goes_to_a_holder():
    plans = [SavePlan([]), SavePlan([item("h")])]
    reports = [StagedItems(frozenset(), frozenset({index("h")})), StagedItems(frozenset(), frozenset())]
    assert owners(plans, reports) == {"h": 0}


def test_an_item_no_rank_staged_fails_the_save_naming_it():
    plans = [SavePlan([]), SavePlan([item("lost")])]
    reports = [StagedItems(frozenset(), frozenset()), StagedItems(frozenset(), frozenset())]
    with pytest.raises(OwnerlessItemError, match="lost"):
        assign_owners(plans, reports)


def test_ranks_that_did_not_stage_write_what_dcp_gives_them():
    plans = [SavePlan([item("s")]), SavePlan([item("t")])]
    assert owners(plans, [None, None]) == {"s": 0, "t": 1}
