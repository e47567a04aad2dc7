"""Separability of H+ vs H- per layer: held-out probe accuracy and Fisher ratio.

Reads the per-sample (token-mean) activations an iteration captured,
``IterationResult.positives/negatives`` of shape ``[n_pairs, n_hooks, d_model]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from sims_lens.separability import fisher_ratio, probe_accuracy
from sims_lens.steering.functions import layer_of

COLUMNS = ["hook", "layer", "probe_accuracy", "fisher_ratio", "n_pairs"]


def separability(
    positives: Float[Tensor, "n_pairs n_hooks d_model"],
    negatives: Float[Tensor, "n_pairs n_hooks d_model"],
    hooks: Sequence[str],
    seed: int = 0,
) -> pd.DataFrame:
    """One row per hook: ``hook, layer, probe_accuracy`` (0.5 = chance), ``fisher_ratio, n_pairs``."""
    if positives.ndim != 3 or negatives.ndim != 3 or positives.shape[1:] != negatives.shape[1:]:
        raise ValueError(
            f"positives and negatives must be [n, n_hooks, d_model] alike, got {tuple(positives.shape)} "
            f"and {tuple(negatives.shape)}"
        )
    if positives.shape[1] != len(hooks):
        raise ValueError(f"{positives.shape[1]} hooks of activations but {len(hooks)} hook names")
    rows = [
        {
            "hook": hook,
            "layer": layer_of(hook),
            "probe_accuracy": probe_accuracy(positives[:, i], negatives[:, i], seed=seed),
            "fisher_ratio": fisher_ratio(positives[:, i], negatives[:, i]),
            "n_pairs": int(positives.shape[0]),
        }
        for i, hook in enumerate(hooks)
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def result_separability(result: Any, seed: int = 0) -> pd.DataFrame:
    """:func:`separability` of a loop ``IterationResult``."""
    return separability(result.positives, result.negatives, result.hooks, seed=seed)
