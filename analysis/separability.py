"""Separability of H+ vs H- per layer: cross-validated probe accuracy, its null, Fisher ratio.

Reads the per-sample (token-mean) activations an iteration captured,
``IterationResult.positives/negatives`` of shape ``[n_pairs, n_hooks, d_model]``, and the prompt
of every pair (``IterationResult.selection.pairs``): the folds are grouped by prompt
(:func:`sims_lens.separability.separability`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from sims_lens.separability import separability as measure
from sims_lens.steering.functions import layer_of

COLUMNS = ["hook", "layer", "probe_accuracy", "probe_accuracy_null", "fisher_ratio", "n_pairs"]


def separability(
    positives: Float[Tensor, "n_pairs n_hooks d_model"],
    negatives: Float[Tensor, "n_pairs n_hooks d_model"],
    hooks: Sequence[str],
    groups: Sequence[Hashable] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per hook: ``hook, layer, probe_accuracy, probe_accuracy_null`` (its chance level),
    ``fisher_ratio, n_pairs``; ``groups[i]`` is the prompt of pair ``i`` (``None``: one per pair)."""
    if positives.ndim != 3 or negatives.ndim != 3 or positives.shape != negatives.shape:
        raise ValueError(
            f"positives and negatives must be paired [n_pairs, n_hooks, d_model] alike, got "
            f"{tuple(positives.shape)} and {tuple(negatives.shape)}"
        )
    if positives.shape[1] != len(hooks):
        raise ValueError(f"{positives.shape[1]} hooks of activations but {len(hooks)} hook names")
    rows = []
    for i, hook in enumerate(hooks):
        measured = measure(positives[:, i], negatives[:, i], groups, seed=seed)
        rows.append(
            {
                "hook": hook,
                "layer": layer_of(hook),
                "probe_accuracy": measured.probe_accuracy,
                "probe_accuracy_null": measured.probe_accuracy_null,
                "fisher_ratio": measured.fisher_ratio,
                "n_pairs": int(positives.shape[0]),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def result_separability(result: Any, seed: int = 0) -> pd.DataFrame:
    """:func:`separability` of a loop ``IterationResult``, grouped by the prompt of each selected pair."""
    groups = [pair.positive.prompt_id for pair in result.selection.pairs]
    return separability(result.positives, result.negatives, result.hooks, groups, seed=seed)
