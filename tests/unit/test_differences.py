"""Paired differences of ``sims-lens eval``: which comparisons, how rows are named, planted values."""

from __future__ import annotations

import numpy as np
import pytest

from sims_lens.differences import DIFFERENCE_COLUMNS, comparisons, paired_differences

POLICIES = [
    "base",
    "iter_001",
    "iter_002",
    "prompting",
    "static_first",
    "static_first_matched@iter_001",
    "static_first_matched",
    "fresh_pairs",
    "iter_002x1.5",
    "static_first_matchedx1.5",
]


def test_the_last_iteration_is_compared_with_every_baseline_and_each_iteration_with_base():
    pairs = comparisons(POLICIES)
    last = [b for p, b in pairs if p == "iter_002"]
    assert last == ["base", "prompting", "static_first", "static_first_matched", "fresh_pairs"]
    assert ("iter_001", "base") in pairs and ("iter_001", "static_first_matched@iter_001") in pairs
    assert ("iter_002x1.5", "static_first_matchedx1.5") in pairs  # equal multipliers only
    assert not any(b.endswith("@iter_001") for p, b in pairs if p == "iter_002")
    assert comparisons(["base", "prompting"]) == []


def test_identical_samples_differ_by_exactly_zero_with_a_zero_width_interval():
    rng = np.random.default_rng(0)
    same = {m: rng.normal(size=12) for m in ("reward", "relevance", "kl_to_base")}
    run = {"base": same, "iter_001": dict(same), "static_first": dict(same)}
    frame = paired_differences({"seed_0": run}, n_boot=200)
    assert list(frame.columns) == DIFFERENCE_COLUMNS
    assert len(frame) == 2 * 3  # (iter_001 - base, iter_001 - static_first) x 3 metrics
    assert (frame["value"] == 0).all() and (frame["ci_low"] == 0).all() and (frame["ci_high"] == 0).all()
    assert set(frame["policy"]) == {"iter_001"}  # a single run: the policy alone


def test_a_planted_shift_is_found_and_rows_are_named_per_run_and_pooled():
    rng = np.random.default_rng(1)

    def run(shift):
        base = rng.normal(size=30)
        return {"base": {"reward": base}, "iter_001": {"reward": base + shift + 0.01 * rng.normal(size=30)}}

    frame = paired_differences({"seed_0": run(0.5), "seed_1": run(0.5)}, n_boot=500)
    assert list(frame["policy"]) == ["seed_0/iter_001", "seed_1/iter_001", "iter_001"]
    pooled = frame[frame["policy"] == "iter_001"].iloc[0]
    assert pooled["baseline"] == "base" and pooled["metric"] == "reward"
    assert pooled["value"] == pytest.approx(0.5, abs=0.01)
    assert pooled["ci_low"] < 0.5 < pooled["ci_high"] and pooled["ci_high"] - pooled["ci_low"] < 0.05


def test_a_metric_a_policy_lacks_is_left_out():
    base = {"reward": np.ones(4), "reference_reward": np.ones(4)}
    frame = paired_differences({"r": {"base": base, "iter_001": {"reward": np.zeros(4)}}}, n_boot=50)
    assert list(frame["metric"]) == ["reward"] and frame["value"].iloc[0] == -1.0
