"""Metric rows (``sims_lens/metrics.py``): held-out, training-batch and per-layer rows, the Bradley-Terry
strength, and the tidy table's types; every value computed by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import Tensor

from sims_lens.chat import Exchange
from sims_lens.contrast import Pair, Sample, Selection
from sims_lens.evaluation import Evaluation
from sims_lens.metrics import (
    METRIC_COLUMNS,
    batch_rows,
    bradley_terry_strength,
    empty_metrics,
    heldout_rows,
    layer_rows,
    metric_row,
    tidy_metrics,
)
from sims_lens.separability import probe_accuracy_threshold, separability
from sims_lens.steering.functions import SteeringFunction, SteeringSet


def values(rows: list[dict]) -> dict[str, float]:
    """``{metric: value}`` of rows that are not per layer (each metric once)."""
    assert all(r["layer"] is None for r in rows)
    out = {r["metric"]: r["value"] for r in rows}
    assert len(out) == len(rows), "a metric appears twice"
    return out


def test_metric_row():
    row = metric_row(3, "train", "pairs", 2, layer=5)
    assert row == {"iteration": 3, "split": "train", "metric": "pairs", "layer": 5, "value": 2.0}
    assert type(row["value"]) is float
    assert metric_row(0, "heldout", "x", torch.tensor(0.5))["value"] == 0.5
    assert list(row) == METRIC_COLUMNS


# ---------------------------------------------------------------- held-out rows


def evaluation(reference: list[float] | None = None) -> Evaluation:
    """Two held-out responses of 1 and 3 tokens with mean NLLs 2.0 and 1.0, rewards 0.25 and 0.75."""
    exchanges = [Exchange((1,), (5,)), Exchange((1, 2), (5, 6, 7))]
    return Evaluation(["h0", "h1"], ["a", "b c d"], exchanges, [0.25, 0.75], [2.0, 1.0], reference)


def test_heldout_rows_of_the_base_model():
    rows = heldout_rows(0, evaluation(), None)
    assert {(r["iteration"], r["split"]) for r in rows} == {(0, "heldout")}
    # perplexity by hand, token-weighted: exp((2.0 * 1 + 1.0 * 3) / 4)
    assert values(rows) == {
        "reward_mean": 0.5,
        "perplexity_under_base": pytest.approx(math.exp(1.25)),
        "response_length": 2.0,
    }


def test_heldout_rows_of_a_policy_add_the_win_rate_and_its_strength():
    rows = heldout_rows(2, evaluation(reference=[1.0, 2.0]), 0.75)
    assert {r["iteration"] for r in rows} == {2}
    # 0.75 of 2 comparisons: 1.5 wins, log((1.5 + 0.5) / (0.5 + 0.5)) = log 2
    assert values(rows) == {
        "reward_mean": 0.5,
        "perplexity_under_base": pytest.approx(math.exp(1.25)),
        "response_length": 2.0,
        "reference_reward_mean": 1.5,
        "win_rate_vs_base": 0.75,
        "bt_strength_vs_base": pytest.approx(math.log(2.0)),
    }


def test_heldout_rows_of_relative_oracles_leave_their_means_out():
    got = values(heldout_rows(1, evaluation(reference=[1.0, 2.0]), 0.5, relative=True))
    assert "reward_mean" not in got and got["reference_reward_mean"] == 1.5
    got = values(heldout_rows(1, evaluation(reference=[1.0, 2.0]), 0.5, relative_reference=True))
    assert "reference_reward_mean" not in got and got["reward_mean"] == 0.5
    both = values(heldout_rows(1, evaluation(reference=[1.0, 2.0]), 0.5, relative=True, relative_reference=True))
    assert set(both) == {"perplexity_under_base", "response_length", "win_rate_vs_base", "bt_strength_vs_base"}
    assert both["bt_strength_vs_base"] == 0.0  # level with the base model


# ---------------------------------------------------------------- Bradley-Terry strength


def test_bradley_terry_strength_by_hand():
    assert bradley_terry_strength(0.5, 10) == 0.0
    # half a win added to each side: 4 of 4 -> log(4.5 / 0.5), 0 of 4 -> its negative
    assert bradley_terry_strength(1.0, 4) == pytest.approx(math.log(9.0))
    assert bradley_terry_strength(0.0, 4) == pytest.approx(-math.log(9.0))
    assert bradley_terry_strength(0.25, 4) == pytest.approx(math.log(1.5 / 3.5))
    for p in (0.1, 0.3, 0.8):
        assert bradley_terry_strength(p, 7) == pytest.approx(-bradley_terry_strength(1 - p, 7))


def test_bradley_terry_strength_is_the_logit_of_the_win_rate_over_many_comparisons():
    """+1 means the policy wins sigmoid(1) ~ 73% of comparisons."""
    assert bradley_terry_strength(1 / (1 + math.exp(-1.0)), 10**7) == pytest.approx(1.0, abs=1e-5)
    assert bradley_terry_strength(0.2, 10**7) == pytest.approx(math.log(0.25), abs=1e-5)


# ---------------------------------------------------------------- training-batch rows


def batch(it: int = 2, reference: dict[str, list[float]] | None = None) -> tuple[list[Sample], Selection]:
    """Three prompts of this iteration; the pair of "b" takes its negative from iteration 1."""
    scores = {"a": [0.0, 0.5, 1.0], "b": [0.25, 0.75], "c": [0.5, 0.5]}
    samples = [
        Sample(it, pid, pid, f"r{j}", Exchange((1,), (2,)), r, index=j)
        for pid, rs in scores.items()
        for j, r in enumerate(rs)
    ]
    for s in samples:
        s.reference_reward = None if reference is None else reference[s.prompt_id][s.index]
    a0, _, a2, _, b1, _, _ = samples
    older = Sample(it - 1, "b", "b", "old", Exchange((1,), (2,)), 0.0)
    selection = Selection([Pair(a2, a0), Pair(b1, older)], dropped_prompts=1, considered_prompts=3)
    return samples, selection


def test_batch_rows_by_hand():
    samples, selection = batch()
    rows = batch_rows(2, samples, selection)
    assert {(r["iteration"], r["split"]) for r in rows} == {(2, "train")}
    assert values(rows) == {
        "reward_mean": 0.5,  # (0 + 0.5 + 1 + 0.25 + 0.75 + 0.5 + 0.5) / 7
        "pair_margin_mean": 0.875,  # (1.0 + 0.75) / 2
        "pairs": 2.0,
        "cross_iteration_pairs": 1.0,
        "dropped_prompts": 1.0,
    }


def test_batch_rows_of_a_relative_oracle_have_no_reward_mean():
    samples, selection = batch()
    got = values(batch_rows(2, samples, selection, relative=True))
    assert set(got) == {"pair_margin_mean", "pairs", "cross_iteration_pairs", "dropped_prompts"}


def test_batch_rows_log_the_oracle_agreement_with_a_reference():
    samples, selection = batch(reference={"a": [0.0, 1.0, 0.5], "b": [0.5, 0.5], "c": [0.0, 1.0]})
    got = values(batch_rows(2, samples, selection))
    # by hand, within prompts: a (0,1) agrees, (0,2) agrees, (1,2) disagrees; b's reference ties (skipped);
    # c's scores tie where the reference does not (half): (1 + 1 + 0 + 0.5) / 4
    assert got["oracle_agreement"] == 0.625
    assert "oracle_agreement" not in values(batch_rows(2, *batch()))


# ---------------------------------------------------------------- per-layer rows


def _two_gaussians(n: int, d: int, shift: float, *, seed: int) -> tuple[Tensor, Tensor]:
    """n pairs: pos ~ N(shift u, I), neg ~ N(-shift u, I) for a fixed unit ``u``."""
    u = torch.randn(d, generator=torch.Generator().manual_seed(99))
    u = u / u.norm()
    g = torch.Generator().manual_seed(seed)
    return shift * u + torch.randn(n, d, generator=g), -shift * u + torch.randn(n, d, generator=g)


def _adds(hooks: list[str], scales: list[float]) -> SteeringSet:
    return SteeringSet.from_functions(
        SteeringFunction(edit="add", hook=hook, params={"vector": s * torch.ones(4)})
        for hook, s in zip(hooks, scales, strict=True)
    )


def test_layer_rows_report_the_three_measures_per_layer_and_nan_for_a_single_prompt() -> None:
    hooks = ["blocks.1.hook_resid_post", "blocks.4.hook_resid_post"]
    steering = SteeringSet.from_functions(
        SteeringFunction(edit="add", hook=hook, params={"vector": torch.ones(4)}) for hook in hooks
    )
    pos, neg = _two_gaussians(8, 4, 2.0, seed=1)
    positives, negatives = torch.stack([pos, pos], dim=1), torch.stack([neg, neg], dim=1)
    groups = [f"p{i // 2}" for i in range(8)]
    rows = layer_rows(
        1,
        hooks=hooks,
        positives=positives,
        negatives=negatives,
        prompt_ids=groups,
        fitted=steering,
        policy=steering,
        seed=5,
    )
    got = {(r["metric"], r["layer"]): r["value"] for r in rows}
    assert {r["split"] for r in rows} == {"train"} and {layer for _, layer in got} == {1, 4, None}
    # one row without a layer: the family-wise threshold over the steered layers
    assert [metric for metric, layer in got if layer is None] == ["probe_accuracy_threshold"]
    threshold = probe_accuracy_threshold(positives, negatives, groups, seed=5)
    assert got[("probe_accuracy_threshold", None)] == threshold and 0.5 < threshold <= 1.0
    expected = separability(pos, neg, groups, seed=5)
    for layer in (1, 4):
        assert got[("probe_accuracy", layer)] == expected.probe_accuracy
        assert got[("probe_accuracy_null", layer)] == expected.probe_accuracy_null
        assert got[("fisher_ratio", layer)] == expected.fisher_ratio
    single = layer_rows(
        1,
        hooks=hooks,
        positives=positives,
        negatives=negatives,
        prompt_ids=["p"] * 8,
        fitted=steering,
        policy=steering,
        seed=5,
    )
    at_1 = {r["metric"]: r["value"] for r in single if r["layer"] == 1}
    assert math.isnan(at_1["probe_accuracy"]) and math.isnan(at_1["fisher_ratio"]) and at_1["fit_norm"] == 2.0
    assert math.isnan(next(r["value"] for r in single if r["metric"] == "probe_accuracy_threshold"))


def test_layer_rows_take_each_hooks_own_activations_and_norms():
    hooks = ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"]
    first, second = _two_gaussians(8, 4, 2.0, seed=1), _two_gaussians(8, 4, 0.25, seed=2)
    positives = torch.stack([first[0], second[0]], dim=1)
    negatives = torch.stack([first[1], second[1]], dim=1)
    rows = layer_rows(
        3,
        hooks=hooks,
        positives=positives,
        negatives=negatives,
        prompt_ids=None,  # one prompt per pair
        fitted=_adds(hooks, [1.0, 0.5]),
        policy=_adds(hooks, [3.0, -2.0]),
        seed=0,
    )
    assert len(rows) == 2 * 5 + 1 and {(r["iteration"], r["split"]) for r in rows} == {(3, "train")}
    got = {(r["metric"], r["layer"]): r["value"] for r in rows}
    # norms of c * ones(4): 2 |c|
    assert (got[("fit_norm", 0)], got[("fit_norm", 3)]) == (2.0, 1.0)
    assert (got[("policy_norm", 0)], got[("policy_norm", 3)]) == (6.0, 4.0)
    for layer, (pos, neg) in [(0, first), (3, second)]:
        expected = separability(pos, neg, None, seed=0)
        assert got[("probe_accuracy", layer)] == expected.probe_accuracy
        assert got[("fisher_ratio", layer)] == expected.fisher_ratio
    assert got[("fisher_ratio", 0)] != got[("fisher_ratio", 3)]  # so the hooks' data are told apart


# ---------------------------------------------------------------- the tidy table


def test_tidy_metrics_normalises_columns_and_types():
    raw = pd.DataFrame(
        {
            "value": ["0.5", 2, "not a number"],
            "extra": [1, 2, 3],
            "metric": ["reward_mean", "fit_norm", "pairs"],
            "layer": [None, "3", ""],
            "split": ["heldout", "train", "train"],
            "iteration": ["0", 1, 2],
        }
    )
    frame = tidy_metrics(raw)
    assert list(frame.columns) == METRIC_COLUMNS
    assert frame["iteration"].tolist() == [0, 1, 2] and str(frame["iteration"].dtype) == "int64"
    assert frame["split"].tolist() == ["heldout", "train", "train"]
    assert frame["metric"].tolist() == ["reward_mean", "fit_norm", "pairs"]
    assert str(frame["layer"].dtype) == "float64" and str(frame["value"].dtype) == "float64"
    layer, value = frame["layer"].tolist(), frame["value"].tolist()
    assert math.isnan(layer[0]) and layer[1] == 3.0 and math.isnan(layer[2])
    assert value[:2] == [0.5, 2.0] and math.isnan(value[2])
    assert raw["iteration"].tolist() == ["0", 1, 2] and "extra" in raw  # the input is left as it was


def test_tidy_metrics_of_metric_rows_round_trips_through_csv(tmp_path):
    rows = [metric_row(0, "heldout", "reward_mean", 0.25), metric_row(1, "train", "fit_norm", 2.0, layer=4)]
    path = tmp_path / "metrics.csv"
    pd.DataFrame(rows, columns=METRIC_COLUMNS).to_csv(path, index=False)
    back = tidy_metrics(pd.read_csv(path))
    pd.testing.assert_frame_equal(back, tidy_metrics(pd.DataFrame(rows)))
    assert back["layer"].tolist()[1] == 4.0 and math.isnan(back["layer"].tolist()[0])


def test_empty_metrics():
    frame = empty_metrics()
    assert frame.empty and list(frame.columns) == METRIC_COLUMNS
    assert [str(frame[c].dtype) for c in ("iteration", "layer", "value")] == ["int64", "float64", "float64"]
    assert pd.api.types.is_string_dtype(frame["split"]) and pd.api.types.is_string_dtype(frame["metric"])
