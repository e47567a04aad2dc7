"""Unit tests for sims_lens.stats: known answers for the bootstrap intervals, win fractions,
distinct-n and token-weighted perplexity (numpy only: no torch here)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sims_lens.stats import (
    Estimate,
    bootstrap_ratio,
    distinct_n,
    paired_difference,
    prompt_mean_win_rate,
    ratio,
    token_weighted_perplexity,
    win_fractions,
)


def test_ratio_is_sum_over_sum_with_nan_left_out_of_both_sums():
    rng = np.random.default_rng(1)
    num, den = rng.uniform(0, 5, size=(3, 7)), rng.integers(1, 20, size=(3, 7)).astype(float)
    assert bootstrap_ratio(num, den).value == pytest.approx(num.sum() / den.sum(), rel=1e-12)
    assert bootstrap_ratio(num).value == pytest.approx(num.mean(), rel=1e-12)
    num[0, 0], den[1, 2] = np.nan, np.nan
    keep = ~(np.isnan(num) | np.isnan(den))
    assert ratio(num, den) == pytest.approx(num[keep].sum() / den[keep].sum(), rel=1e-12)
    assert ratio(num) == pytest.approx(np.nanmean(num), rel=1e-12)


def test_perplexity_from_nll_sums_over_token_counts():
    nll_means, lengths = np.array([[1.0, 2.0]]), np.array([[3.0, 1.0]])
    estimate = bootstrap_ratio(nll_means * lengths, lengths, transform=np.exp)
    assert estimate.value == pytest.approx(math.exp(1.25))
    assert estimate.ci_low <= estimate.value <= estimate.ci_high
    assert math.exp(1.0) <= estimate.ci_low and estimate.ci_high <= math.exp(2.0)


def test_single_run_single_prompt_collapses_to_the_value():
    assert bootstrap_ratio([[3.0]], [[2.0]]) == Estimate(1.5, 1.5, 1.5)
    assert bootstrap_ratio([0.5], transform=np.exp) == Estimate(math.exp(0.5), math.exp(0.5), math.exp(0.5))


def test_interval_covers_the_true_mean_at_about_the_nominal_rate():
    # The percentile bootstrap of a mean of n=40 normals undercovers a little (its interval is a
    # z-interval with the plug-in sd, about P(|t_39| < 1.96 sqrt(39/40)) = 0.94). With 300
    # repetitions the binomial sd of the observed coverage is sqrt(0.94 * 0.06 / 300) = 0.014:
    # accept 0.94 +- 3.5 sd, i.e. [0.89, 0.99]. A prompt-free or 80% interval falls far outside.
    rng = np.random.default_rng(2024)
    repetitions, true_mean = 300, 1.5
    covered = 0
    for rep in range(repetitions):
        sample = rng.normal(true_mean, 2.0, size=40)
        estimate = bootstrap_ratio(sample, n_boot=1000, seed=rep)
        covered += estimate.ci_low <= true_mean <= estimate.ci_high
    sd = math.sqrt(0.94 * 0.06 / repetitions)
    assert 0.94 - 3.5 * sd <= covered / repetitions <= 0.94 + 3.5 * sd


def test_hierarchical_interval_is_wider_when_runs_differ_in_level():
    rng = np.random.default_rng(3)
    levels = np.array([0.0, 1.0, 2.0, 3.0, 4.0])[:, None]
    values = levels + rng.normal(0.0, 1.0, size=(5, 60))
    hierarchical = bootstrap_ratio(values)
    pooled = bootstrap_ratio(values.mean(axis=0))  # the same point estimate, prompts only
    assert hierarchical.value == pytest.approx(pooled.value)
    # Run spread: sd 1.41 over 5 runs (se 0.63) against prompt noise sd 1/sqrt(5) over 60 prompts
    # (se 0.058): the hierarchical interval must be several times wider.
    assert hierarchical.ci_high - hierarchical.ci_low > 4 * (pooled.ci_high - pooled.ci_low)


def test_prompts_are_resampled_jointly_across_runs():
    # Identical runs: with the same prompts drawn for every run a replicate is a prompt-resampled
    # mean of the one run, so the interval is as wide as the single run's. Drawing prompts
    # independently per run would shrink it by about sqrt(5).
    x = np.random.default_rng(4).normal(size=60)
    single = bootstrap_ratio(x)
    repeated = bootstrap_ratio(np.tile(x, (5, 1)))
    ratio_of_widths = (repeated.ci_high - repeated.ci_low) / (single.ci_high - single.ci_low)
    assert 0.85 < ratio_of_widths < 1.15


def test_paired_difference_of_identical_arrays_is_exactly_zero():
    a = np.random.default_rng(5).normal(size=(4, 30))
    assert paired_difference(a, a.copy()) == Estimate(0.0, 0.0, 0.0)


def test_paired_difference_removes_the_shared_prompt_effect():
    rng = np.random.default_rng(6)
    prompt_effect = rng.normal(0.0, 5.0, size=50)
    b = prompt_effect + rng.normal(0.0, 0.1, size=50)
    a = prompt_effect + 1.0 + rng.normal(0.0, 0.1, size=50)
    estimate = paired_difference(a, b)
    assert estimate.value == pytest.approx(np.mean(a - b))
    assert 0.9 < estimate.ci_low < 1.0 < estimate.ci_high < 1.1


def test_bootstrap_is_deterministic_given_the_seed():
    values = np.random.default_rng(7).normal(size=(3, 20))
    assert bootstrap_ratio(values, seed=11) == bootstrap_ratio(values, seed=11)
    assert bootstrap_ratio(values, seed=11) != bootstrap_ratio(values, seed=12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bootstrap_ratio(np.ones((2, 3)), np.ones((3, 2))), "same shape"),
        (lambda: bootstrap_ratio(np.ones((2, 3, 4))), r"\[n_runs, n_prompts\]"),
        (lambda: bootstrap_ratio(np.ones((2, 0))), "at least one run and one prompt"),
        (lambda: bootstrap_ratio(np.ones(3), level=95), "level"),
        (lambda: bootstrap_ratio(np.ones(3), n_boot=0), "n_boot"),
        (lambda: bootstrap_ratio(np.zeros(3), np.zeros(3)), "non-zero denominator"),
        (lambda: paired_difference(np.ones((2, 3)), np.ones((2, 4))), "same shape"),
        (lambda: win_fractions(np.ones(3), np.ones(3)), r"\[n_prompts, n_samples\]"),
        (lambda: win_fractions(np.ones((2, 3)), np.ones((3, 2))), r"\[n_prompts, n_samples\]"),
        (lambda: token_weighted_perplexity([1.0, 2.0], [3]), "same length"),
        (lambda: token_weighted_perplexity([1.0], [0]), "at least one response token"),
        (lambda: distinct_n(["a"], n=0), "at least 1"),
    ],
)
def test_bad_inputs_give_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_win_rate_against_itself_is_one_half():
    scores = np.random.default_rng(9).normal(size=(10, 4))
    assert prompt_mean_win_rate(scores, scores) == 0.5
    assert np.all(win_fractions(scores, scores) == 0.5)
    assert prompt_mean_win_rate(scores[:, 0], scores[:, 0]) == 0.5


def test_win_fractions_count_ties_as_half_and_leave_out_missing_pairs():
    policy = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, np.nan, 0.0]])
    base = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 5.0, 0.0]])
    fractions = win_fractions(policy, base)
    np.testing.assert_allclose(fractions, [2.5 / 3, 1.0 / 3, 1.5 / 2])
    assert prompt_mean_win_rate(policy, base) == pytest.approx((2.5 / 3 + 1.0 / 3 + 1.5 / 2) / 3)
    assert prompt_mean_win_rate(policy, base) == pytest.approx(bootstrap_ratio(fractions).value)
    assert np.isnan(win_fractions([[np.nan]], [[1.0]])[0])


def test_win_rate_of_a_dominating_policy_is_one():
    base = np.random.default_rng(10).normal(size=(6, 3))
    assert prompt_mean_win_rate(base + 1.0, base) == 1.0
    assert prompt_mean_win_rate(base, base + 1.0) == 0.0


def test_distinct_n_known_answers():
    assert distinct_n(["a", "a", "a", "a"], n=2) == pytest.approx(1 / 3)
    assert distinct_n([1, 2, 3, 4, 5], n=2) == 1.0
    assert distinct_n([1, 1, 2], n=1) == pytest.approx(2 / 3)
    assert distinct_n(["a", "b", "a", "b"], n=2) == pytest.approx(2 / 3)
    assert distinct_n(["a"], n=2) == 0.0
    assert distinct_n([], n=1) == 0.0


def test_token_weighted_perplexity_known_case():
    assert token_weighted_perplexity([1.0, 2.0], [3, 1]) == pytest.approx(math.exp(1.25))
    # An empty response (no tokens, NaN mean NLL) is left out, as in Evaluation.perplexity.
    assert token_weighted_perplexity([1.0, 2.0, np.nan], [3, 1, 0]) == pytest.approx(math.exp(1.25))
    nll, lengths = np.array([0.5, 1.5, 3.0]), np.array([10, 2, 5])
    expected = bootstrap_ratio(nll * lengths, lengths, transform=np.exp).value
    assert token_weighted_perplexity(nll, lengths) == pytest.approx(expected)
