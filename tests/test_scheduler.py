"""TargetHalving: successive halving within a target, never across; decisions survive a restart."""

from __future__ import annotations

import pickle

from ray.tune.schedulers import TrialScheduler

from allatt_dist.search.scheduler import TargetHalving, group_of, rungs

STOP, GO = TrialScheduler.STOP, TrialScheduler.CONTINUE


def test_rungs_never_land_on_the_last_step():
    assert rungs(100, 2, 200) == [100]  # ASHA would also place one at 200, the last report
    assert rungs(10, 2, 30) == [10, 20]
    assert rungs(10, 3, 100) == [10, 30, 90]
    assert rungs(50, 2, 50) == []


def test_trials_compete_only_within_their_target(tmp_path):
    s = TargetHalving(10, 2, 30, tmp_path / "scheduler.json")
    s.set_search_properties("valid_ppl", "min")
    dense_ish, sparse = group_of({"gates.sparsity_target": 0.25}), group_of({"gates.sparsity_target": 0.75})
    assert dense_ish != sparse
    # every sparse trial is worse than every dense-ish one: across targets, ASHA would stop them all
    assert s.decide("a", dense_ish, 10, 100.0) == GO
    assert s.decide("b", dense_ish, 10, 120.0) == STOP  # worse than a, same target
    assert s.decide("c", sparse, 10, 300.0) == GO  # first of its target
    assert s.decide("d", sparse, 10, 250.0) == GO  # better than c
    assert s.decide("e", sparse, 10, 400.0) == STOP
    assert s.decide("c", sparse, 20, 280.0) == GO  # alone at rung 20 of its target
    assert s.decide("a", dense_ish, 25, 90.0) == GO  # still rung 20 (25 < 40): first there


def test_decisions_are_replayed_after_a_restart(tmp_path):
    path = tmp_path / "scheduler.json"
    s = TargetHalving(10, 2, 30, path)
    assert s.decide("a", "g", 10, 100.0) == GO
    assert s.decide("b", "g", 10, 120.0) == STOP
    again = pickle.loads(pickle.dumps(s))  # as Tuner.restore brings it back: history from the file
    assert again._state is None
    assert again.decide("b", "g", 20, 50.0) == STOP  # resumed past its stop: still stopped
    assert again.decide("a", "g", 10, 999.0) == GO  # the recorded answer, not a new comparison
    assert again.decide("c", "g", 10, 115.0) == STOP  # worse than the median of a and b, as recorded
    fresh = TargetHalving(10, 2, 30, tmp_path / "other.json")
    assert fresh.decide("c", "g", 10, 115.0) == GO  # without the history it would have continued
