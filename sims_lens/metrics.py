"""Metric rows: the tidy table every run writes (``metrics.csv``) and how one iteration fills it.

One row per (iteration, split, metric, layer): ``layer`` is None where a metric is not per layer.
Splits: ``train`` (the iteration's own samples and pairs), ``heldout`` (prompts the loop never
trains on; iteration 0 is the base model) and ``analysis`` (written by the analysis callbacks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from torch import Tensor

from sims_lens.contrast import Sample, Selection, group_by_prompt
from sims_lens.evaluation import Evaluation
from sims_lens.oracles.base import agreement
from sims_lens.separability import fisher_ratio, probe_accuracy
from sims_lens.steering.functions import SteeringSet, layer_of

METRIC_COLUMNS = ["iteration", "split", "metric", "layer", "value"]
HELDOUT_METRICS = ["reward_mean", "win_rate_vs_base", "perplexity_under_base", "response_length"]
"""The held-out metrics of every iteration (``reference_reward_mean`` joins them with a reference oracle)."""

MetricRow = dict[str, Any]
"""One tidy row: iteration, split, metric, layer (None where it does not apply), value."""


def metric_row(iteration: int, split: str, metric: str, value: float, layer: int | None = None) -> MetricRow:
    return {"iteration": iteration, "split": split, "metric": metric, "layer": layer, "value": float(value)}


def heldout_rows(iteration: int, evaluation: Evaluation, win_rate_vs_base: float | None) -> list[MetricRow]:
    """Held-out rows; ``win_rate_vs_base`` is None for the base model itself (iteration 0)."""
    rows = [
        metric_row(iteration, "heldout", "reward_mean", evaluation.reward_mean),
        metric_row(iteration, "heldout", "perplexity_under_base", evaluation.perplexity),
        metric_row(iteration, "heldout", "response_length", evaluation.response_length),
    ]
    if evaluation.reference_reward_mean is not None:
        rows.append(metric_row(iteration, "heldout", "reference_reward_mean", evaluation.reference_reward_mean))
    if win_rate_vs_base is not None:
        rows.append(metric_row(iteration, "heldout", "win_rate_vs_base", win_rate_vs_base))
    return rows


def batch_rows(iteration: int, samples: Sequence[Sample], selection: Selection) -> list[MetricRow]:
    """The training batch: mean reward, mean pair margin, pairs kept and prompts dropped, oracle agreement."""
    rewards = [s.reward for s in samples]
    margins = [p.margin for p in selection.pairs]
    rows = [
        metric_row(iteration, "train", "reward_mean", sum(rewards) / len(rewards)),
        metric_row(iteration, "train", "pair_margin_mean", sum(margins) / len(margins)),
        metric_row(iteration, "train", "pairs", len(selection.pairs)),
        metric_row(iteration, "train", "dropped_prompts", selection.dropped_prompts),
    ]
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
    fitted: SteeringSet,
    policy: SteeringSet,
    seed: int,
) -> list[MetricRow]:
    """Per steered layer: the norms of the new fit and of the policy, and how separable H+ and H- are."""
    fit_norms, policy_norms = fitted.norms(), policy.norms()
    rows = []
    for i, hook in enumerate(hooks):
        layer = layer_of(hook)
        pos, neg = positives[:, i], negatives[:, i]
        rows += [
            metric_row(iteration, "train", "fit_norm", fit_norms[hook], layer),
            metric_row(iteration, "train", "policy_norm", policy_norms[hook], layer),
            metric_row(iteration, "train", "probe_accuracy", probe_accuracy(pos, neg, seed=seed), layer),
            metric_row(iteration, "train", "fisher_ratio", fisher_ratio(pos, neg), layer),
        ]
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
