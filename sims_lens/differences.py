"""Paired differences between policies of ``sims-lens eval``: the test that separate intervals cannot give.

Every policy answers the same held-out prompts with the same seeds, so ``policy - baseline`` can be
taken prompt by prompt: the spread between prompts, which both share, drops out. Each row is the
mean difference with a 95% bootstrap interval over prompts (and over runs as well in pooled rows).

Rows of ``differences.csv`` (:data:`DIFFERENCE_COLUMNS`, in this order): the last iteration minus
every other policy that is not an iteration (``base`` and the baselines); each iteration minus
``base``; and each iteration minus a baseline at that iteration's norm (``NAME@iter_NNN``). A run's
own rows name the policy ``RUN/POLICY``; rows pooled over several runs name the policy alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from sims_lens.seeds import derive_seed
from sims_lens.stats import paired_difference

DIFFERENCE_COLUMNS = ["policy", "baseline", "metric", "value", "ci_low", "ci_high"]
DIFFERENCE_METRICS = ("reward", "reference_reward", "relevance", "kl_to_base")
DIFFERENCES_FILE = "differences.csv"

PromptMeans = Mapping[str, Mapping[str, np.ndarray]]
"""``[policy][metric]``: each prompt's mean over its samples, ``[n_prompts]``, for one run."""


def comparisons(policies: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(policy, baseline)`` pairs to difference, among the policies one run evaluated.

    The last iteration minus ``base`` and every baseline (not their variants); each earlier iteration
    minus ``base`` and minus a baseline at its own norm (``NAME@iter_NNN``); and the last iteration
    at a multiplier minus a baseline at the same multiplier (``iter_TxM - NAMExM``).
    """
    iterations = sorted(p for p in policies if is_iteration(p))
    if not iterations:
        return []
    last = iterations[-1]
    roots = [p for p in policies if not is_iteration(p) and "@" not in p and not _multiplied(p, policies)]
    out = [(last, other) for other in roots]
    out += [(t, "base") for t in iterations[:-1] if "base" in policies]
    out += [(t, other) for t in iterations[:-1] for other in policies if other.endswith(f"@{t}")]
    for scaled in (p for p in policies if p.startswith(f"{last}x")):
        suffix = scaled[len(last) :]
        out += [(scaled, f"{root}{suffix}") for root in roots if f"{root}{suffix}" in policies]
    return out


def paired_differences(runs: Mapping[str, PromptMeans], *, n_boot: int = 2000) -> pd.DataFrame:
    """The rows of ``differences.csv`` for these runs.

    One run: its rows name the policy alone. Several: each run's rows (``RUN/POLICY``), then rows
    pooled over the runs (the policy alone) for the comparisons every run has.
    """
    names = list(runs)
    rows: list[dict[str, object]] = []
    if len(names) > 1:
        for run in names:
            rows += _rows({run: runs[run]}, comparisons(list(runs[run])), n_boot, f"{run}/")
    shared = [c for c in comparisons(list(runs[names[0]])) if all(set(c) <= set(runs[r]) for r in names)]
    rows += _rows(runs, shared, n_boot, "")
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)


def _rows(
    runs: Mapping[str, PromptMeans], pairs: Sequence[tuple[str, str]], n_boot: int, prefix: str
) -> list[dict[str, object]]:
    """One row per comparison and metric: the mean over runs and prompts of policy - baseline."""
    out: list[dict[str, object]] = []
    for policy, baseline in pairs:
        for metric in DIFFERENCE_METRICS:
            a = _stack(runs, policy, metric)
            b = _stack(runs, baseline, metric)
            if a is None or b is None or np.isnan(a - b).all():
                continue
            seed = derive_seed(0, "difference", policy, baseline, metric)
            estimate = paired_difference(a, b, n_boot=n_boot, seed=seed)
            out.append(
                {
                    "policy": f"{prefix}{policy}",
                    "baseline": baseline,
                    "metric": metric,
                    "value": estimate.value,
                    "ci_low": estimate.ci_low,
                    "ci_high": estimate.ci_high,
                }
            )
    return out


def _stack(runs: Mapping[str, PromptMeans], policy: str, metric: str) -> np.ndarray | None:
    """``[n_runs, n_prompts]`` of one policy's metric, None if a run lacks it."""
    grids = [runs[r].get(policy, {}).get(metric) for r in runs]
    if any(g is None for g in grids):
        return None
    return np.stack([np.asarray(g, dtype=float) for g in grids])


def is_iteration(policy: str) -> bool:
    """``iter_NNN`` itself (not ``iter_NNNxM``, a scaled copy)."""
    return policy.startswith("iter_") and policy[5:].isdigit()


def _multiplied(policy: str, policies: Sequence[str]) -> bool:
    """``NAMExM``: another evaluated policy scaled by a multiplier."""
    root, sep, factor = policy.rpartition("x")
    return bool(sep) and root in policies and _is_number(factor)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
