"""A service's collector after ``tune_for_service``: what existed is frozen, young collections rarer."""

from __future__ import annotations

import gc

from livemig.gctune import YOUNG_THRESHOLD, tune_for_service


def test_startup_objects_are_frozen_and_young_collections_are_rarer() -> None:
    before, frozen_before = gc.get_threshold(), gc.get_freeze_count()
    try:
        lasting = [{"n": i} for i in range(1000)]  # tracked containers the service keeps
        tune_for_service()
        assert gc.get_freeze_count() >= frozen_before + len(lasting)
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
        assert gc.isenabled()  # cyclic garbage is still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
