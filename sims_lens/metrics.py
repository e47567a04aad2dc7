"""Metric rows: the tidy table every run writes (``metrics.csv``) and how one iteration fills it.

One row per (iteration, split, metric, layer): ``layer`` is None where a metric is not per layer.
Splits: ``train`` (the iteration's own samples and pairs), ``heldout`` (prompts the loop never
trains on; iteration 0 is the base model), ``guard`` (the guard rail: the candidate policy's
perplexity ratio to the base model and whether it was rejected) and ``analysis`` (written by the
analysis callbacks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from torch import Tensor

from sims_lens.contrast import Sample, Selection, group_by_prompt
from sims_lens.evaluation import Evaluation
from sims_lens.oracles.base import agreement
from sims_lens.separability import probe_accuracy_threshold, separability_by_hook
from sims_lens.steering.functions import SteeringSet, layer_of

METRIC_COLUMNS = ["iteration", "split", "metric", "layer", "value"]
HELDOUT_METRICS = ["reward_mean", "win_rate_vs_base", "perplexity_under_base", "response_length"]
"""The held-out metrics of every iteration (``reference_reward_mean`` joins them with a reference oracle,
``bt_strength_vs_base`` goes with the win rate; a relative oracle has no ``reward_mean``)."""

MetricRow = dict[str, Any]
"""One tidy row: iteration, split, metric, layer (None where it does not apply), value."""


def metric_row(iteration: int, split: str, metric: str, value: float, layer: int | None = None) -> MetricRow:
    return {"iteration": iteration, "split": split, "metric": metric, "layer": layer, "value": float(value)}


def heldout_rows(
    iteration: int,
    evaluation: Evaluation,
    win_rate_vs_base: float | None,
    *,
    relative: bool = False,
    relative_reference: bool = False,
) -> list[MetricRow]:
    """Held-out rows; ``win_rate_vs_base`` is None for the base model itself (iteration 0).

    A relative oracle's scores sum to a constant within each prompt's group, so their mean says
    nothing (``relative``): then only the head-to-head win rate against the base model and its
    Bradley-Terry strength are reported, never ``reward_mean``. Likewise ``reference_reward_mean``
    is left out for a relative reference oracle.
    """
    rows = [
        metric_row(iteration, "heldout", "perplexity_under_base", evaluation.perplexity),
        metric_row(iteration, "heldout", "response_length", evaluation.response_length),
    ]
    if not relative:
        rows.insert(0, metric_row(iteration, "heldout", "reward_mean", evaluation.reward_mean))
    if evaluation.reference_reward_mean is not None and not relative_reference:
        rows.append(metric_row(iteration, "heldout", "reference_reward_mean", evaluation.reference_reward_mean))
    if win_rate_vs_base is not None:
        rows.append(metric_row(iteration, "heldout", "win_rate_vs_base", win_rate_vs_base))
        strength = bradley_terry_strength(win_rate_vs_base, len(evaluation.rewards))
        rows.append(metric_row(iteration, "heldout", "bt_strength_vs_base", strength))
    return rows


def bradley_terry_strength(win_rate: float, comparisons: int) -> float:
    """The policy's Bradley-Terry log-strength over the base model from a paired win rate.

    With p = P(policy beats base) = sigmoid(s_policy - s_base) and s_base = 0, s = log(p / (1 - p)),
    estimated with half a win added to each side (so 0 or 1 win rates stay finite): 0 means level
    with the base model, +1 means it wins about 73% of comparisons.
    """
    wins = win_rate * comparisons
    return math.log((wins + 0.5) / (comparisons - wins + 0.5))


def batch_rows(
    iteration: int, samples: Sequence[Sample], selection: Selection, *, relative: bool = False
) -> list[MetricRow]:
    """The training batch: mean reward (absolute oracles only), pair margins, pairs kept and dropped.

    ``cross_iteration_pairs`` counts pairs whose sides different policies sampled (contrast
    sampling); ``oracle_agreement`` is logged when a reference oracle scored the samples too.
    """
    margins = [p.margin for p in selection.pairs]
    rows = [
        metric_row(iteration, "train", "pair_margin_mean", sum(margins) / len(margins)),
        metric_row(iteration, "train", "pairs", len(selection.pairs)),
        metric_row(iteration, "train", "cross_iteration_pairs", sum(p.cross_iteration for p in selection.pairs)),
        metric_row(iteration, "train", "dropped_prompts", selection.dropped_prompts),
    ]
    if not relative:
        rewards = [s.reward for s in samples]
        rows.insert(0, metric_row(iteration, "train", "reward_mean", sum(rewards) / len(rewards)))
    if samples and samples[0].reference_reward is not None:
        groups = list(group_by_prompt(samples).values())
        scores = [[s.reward for s in g] for g in groups]
        reference = [[float(s.reference_reward or 0.0) for s in g] for g in groups]
        rows.append(metric_row(iteration, "train", "oracle_agreement", agreement(scores, reference)))
    return rows


def layer_rows(
    iteration: int,
    *,
    hooks: Sequence[str],
    positives: Tensor,
    negatives: Tensor,
    prompt_ids: Sequence[str] | None,
    fitted: SteeringSet,
    policy: SteeringSet,
    seed: int,
) -> list[MetricRow]:
    """Per steered layer: the norms of the new fit and of the policy, and how separable H+ and H- are.

    ``prompt_ids[i]`` is the prompt of pair ``i``: separability (``probe_accuracy``, its permutation
    null ``probe_accuracy_null`` and ``fisher_ratio``) is cross-validated over folds of prompts
    (:func:`sims_lens.separability.separability`). One more row, ``probe_accuracy_threshold`` (no
    layer), is the 95% family-wise permutation threshold over these hooks
    (:func:`sims_lens.separability.probe_accuracy_threshold`: the null's maximum over layers): a
    layer whose ``probe_accuracy`` exceeds it is separable beyond what picking the best of them
    gives by chance. With every pair from one prompt (``pairs_per_prompt`` > 1) nothing can be held
    out, and all four are NaN.
    """
    fit_norms, policy_norms = fitted.norms(), policy.norms()
    measured = separability_by_hook(positives, negatives, hooks, prompt_ids, seed=seed)
    rows = []
    for hook in hooks:
        layer, sep = layer_of(hook), measured[hook]
        rows += [
            metric_row(iteration, "train", "fit_norm", fit_norms[hook], layer),
            metric_row(iteration, "train", "policy_norm", policy_norms[hook], layer),
            metric_row(iteration, "train", "probe_accuracy", sep.probe_accuracy, layer),
            metric_row(iteration, "train", "probe_accuracy_null", sep.probe_accuracy_null, layer),
            metric_row(iteration, "train", "fisher_ratio", sep.fisher_ratio, layer),
        ]
    threshold = probe_accuracy_threshold(positives, negatives, prompt_ids, seed=seed)
    rows.append(metric_row(iteration, "train", "probe_accuracy_threshold", threshold))
    return rows


def empty_metrics() -> pd.DataFrame:
    return tidy_metrics(pd.DataFrame(columns=METRIC_COLUMNS))


def tidy_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """Normalise a metrics table's types: int iteration, str split/metric, float layer (NaN = none) and value."""
    frame = frame.reindex(columns=METRIC_COLUMNS).copy()
    frame["iteration"] = pd.to_numeric(frame["iteration"]).astype("int64")
    frame["split"] = frame["split"].astype(str)
    frame["metric"] = frame["metric"].astype(str)
    frame["layer"] = pd.to_numeric(frame["layer"], errors="coerce").astype("float64")
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
    return frame
