"""Point estimates with 95% intervals over prompts and seeds, for ``sims-lens eval``.

An evaluation holds one value per (run, prompt): ``run`` is one seed of the loop, ``prompt`` one
held-out prompt. Every run is evaluated on the *same* held-out prompts, so the layout is paired and
the interval is a hierarchical percentile bootstrap: resample runs with replacement and, within one
replicate, the same resampled prompts for every run (:func:`bootstrap_ratio`). The spread between
seeds and the spread between prompts both enter the interval; with one run only prompts vary.

NaN marks a missing value (a prompt a run did not score): it is left out of every sum, never
counted as zero. numpy only: this module must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

Transform = Callable[[np.ndarray], np.ndarray]
"""Applied elementwise to the ratio (and to every bootstrap replicate), e.g. ``np.exp``."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its percentile-bootstrap interval (``ci_low <= ci_high``)."""

    value: float
    ci_low: float
    ci_high: float


def as_runs(values: ArrayLike, name: str = "values") -> np.ndarray:
    """``values`` as a float array ``[n_runs, n_prompts]``; 1-D ``[n_prompts]`` is one run.

    Raises a ValueError naming ``name`` for any other number of dimensions or an empty axis.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{name} must be [n_runs, n_prompts] or [n_prompts], got shape {np.shape(values)}")
    if 0 in array.shape:
        raise ValueError(f"{name} needs at least one run and one prompt, got shape {np.shape(values)}")
    return array


def _masked(num: ArrayLike, den: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    """``num`` and ``den`` as ``[n_runs, n_prompts]`` with every entry where either is NaN set to 0 in both.

    Zeroing an entry in both arrays leaves it out of both sums, so a missing prompt changes neither
    the numerator nor the denominator (``den=None`` is ones: the mean of the present values).
    """
    numerator = as_runs(num, "num")
    denominator = np.ones_like(numerator) if den is None else as_runs(den, "den")
    if denominator.shape != numerator.shape:
        raise ValueError(f"num and den must have the same shape, got {numerator.shape} and {denominator.shape}")
    missing = np.isnan(numerator) | np.isnan(denominator)
    return np.where(missing, 0.0, numerator), np.where(missing, 0.0, denominator)


def _finish(ratio: np.ndarray | float, transform: Transform | None) -> np.ndarray:
    out = np.asarray(ratio, dtype=np.float64)
    return out if transform is None else np.asarray(transform(out), dtype=np.float64)


def ratio(num: ArrayLike, den: ArrayLike | None = None, *, transform: Transform | None = None) -> float:
    """``transform(nansum(num) / nansum(den))`` over all runs and prompts (the point estimate of
    :func:`bootstrap_ratio`); an entry that is NaN in ``num`` or ``den`` is left out of both sums."""
    numerator, denominator = _masked(num, den)
    total = denominator.sum()
    if total == 0:
        raise ValueError("ratio needs a non-zero denominator over the non-missing entries")
    return float(_finish(numerator.sum() / total, transform))


def bootstrap_ratio(
    num: ArrayLike,
    den: ArrayLike | None = None,
    *,
    transform: Transform | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """``transform(sum(num) / sum(den))`` with a hierarchical, paired percentile-bootstrap interval.

    ``num`` and ``den`` are ``[n_runs, n_prompts]`` (or ``[n_prompts]``: one run). ``den=None`` is
    ones, so the statistic is the mean of the per-prompt values; a per-prompt NLL sum over a token
    count with ``transform=np.exp`` gives a token-weighted perplexity. An entry that is NaN in
    ``num`` or ``den`` is left out of both sums (nansum), so a missing value is not read as zero.

    Each replicate draws ``n_runs`` runs and ``n_prompts`` prompts with replacement, the same
    prompts for every run (all runs are evaluated on the same held-out prompts, so resampling them
    jointly keeps the pairing); the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of the replicates. A draw is a multinomial count per run and per prompt, so a
    replicate's sums are ``w_run @ x @ w_prompt`` and the whole bootstrap is two matrix products.
    Replicates whose denominator is 0 (only missing entries drawn) are ignored. With one run and
    one prompt every replicate is the value, and so is the interval. Deterministic given ``seed``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    numerator, denominator = _masked(num, den)
    value = ratio(numerator, denominator, transform=transform)
    n_runs, n_prompts = numerator.shape
    rng = np.random.default_rng(seed)
    run_counts = rng.multinomial(n_runs, np.full(n_runs, 1.0 / n_runs), size=n_boot).astype(np.float64)
    prompt_counts = rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=n_boot).astype(np.float64)
    num_sums = np.einsum("bp,bp->b", run_counts @ numerator, prompt_counts)
    den_sums = np.einsum("bp,bp->b", run_counts @ denominator, prompt_counts)
    drawn = den_sums != 0
    with np.errstate(all="ignore"):
        replicates = _finish(num_sums[drawn] / den_sums[drawn], transform)
    replicates = replicates[~np.isnan(replicates)]
    if replicates.size == 0:
        return Estimate(value, float("nan"), float("nan"))
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(value, float(low), float(high))


def paired_difference(
    a: ArrayLike, b: ArrayLike, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """``mean(a - b)`` over paired entries (same run, same prompt) with :func:`bootstrap_ratio`'s interval.

    For the change between consecutive iterations, or a policy against a baseline: pairing removes
    the between-prompt spread both share. An entry missing (NaN) on either side is left out.
    """
    first, second = as_runs(a, "a"), as_runs(b, "b")
    if first.shape != second.shape:
        raise ValueError(f"a and b must have the same shape, got {first.shape} and {second.shape}")
    return bootstrap_ratio(first - second, n_boot=n_boot, level=level, seed=seed)


def win_outcomes(policy: ArrayLike, base: ArrayLike) -> np.ndarray:
    """Per pair: 1 where the policy's score beats the base's, 1/2 on a tie, 0 below, NaN if a score is NaN."""
    p, b = np.asarray(policy, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if p.shape != b.shape:
        raise ValueError(f"policy and base scores must have the same shape, got {p.shape} and {b.shape}")
    outcome = np.where(p > b, 1.0, np.where(p == b, 0.5, 0.0))
    outcome[np.isnan(p) | np.isnan(b)] = np.nan
    return outcome


def win_fractions(policy: ArrayLike, base: ArrayLike) -> np.ndarray:
    """Per prompt, the fraction of paired samples where the policy's score beats the base's (ties 1/2).

    ``policy`` and ``base`` are ``[n_prompts, n_samples]``, paired by (prompt, sample index). A pair
    with a NaN score is left out; a prompt with no pair left is NaN. The bootstrap of the mean of
    these (:func:`bootstrap_ratio`) is the win rate's interval over prompts.
    """
    p, b = np.asarray(policy, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if p.ndim != 2 or p.shape != b.shape or 0 in p.shape:
        raise ValueError(
            f"policy and base must both be [n_prompts, n_samples] (non-empty), got {p.shape} and {b.shape}"
        )
    outcome = win_outcomes(p, b)
    present = (~np.isnan(outcome)).sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.nansum(outcome, axis=1) / np.where(present > 0, present, np.nan)


def prompt_mean_win_rate(policy_scores: ArrayLike, base_scores: ArrayLike) -> float:
    """The policy's win rate over the base model: the mean over prompts of :func:`win_fractions`.

    (:func:`sims_lens.evaluation.pooled_win_rate` pools all pairs instead.)

    ``[n_prompts, n_samples]`` arrays, or 1-D arrays of paired scores (one sample per prompt). With
    no missing scores this is the fraction of all pairs won (ties 1/2), and it always equals
    ``bootstrap_ratio(win_fractions(...)).value``, so the point estimate sits with its interval.
    """
    p, b = np.asarray(policy_scores, dtype=np.float64), np.asarray(base_scores, dtype=np.float64)
    if p.ndim == 1 and b.ndim == 1:
        p, b = p[:, None], b[:, None]
    return ratio(win_fractions(p, b))


def distinct_n(tokens: Sequence[int | str], n: int = 2) -> float:
    """Unique n-grams over all n-grams of one response: 1.0 means no n-gram repeats.

    A response of fewer than ``n`` tokens has no n-grams and gets 0.0, not 1.0: an empty or
    one-word answer is not diverse, and scoring it as perfectly diverse would reward a policy
    that stops talking.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def token_weighted_perplexity(nll_means: ArrayLike, lengths: ArrayLike) -> float:
    """``exp(sum_i nll_i n_i / sum_i n_i)``: the perplexity of all response tokens pooled.

    ``nll_means[i]`` is response i's mean per-token NLL over its ``lengths[i]`` tokens. Weighting by
    length keeps a short response from counting as much as a long one (the mean of per-response
    perplexities would). Responses with no tokens or a NaN NLL are left out.
    """
    nll, n = np.asarray(nll_means, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    if nll.ndim != 1 or nll.shape != n.shape:
        raise ValueError(f"nll_means and lengths must be 1-D of the same length, got {nll.shape} and {n.shape}")
    if np.any(n < 0):
        raise ValueError("lengths must be non-negative")
    keep = (n > 0) & ~np.isnan(nll)
    if not keep.any():
        raise ValueError("token-weighted perplexity needs at least one response token")
    return ratio(nll[keep] * n[keep], n[keep], transform=np.exp)
