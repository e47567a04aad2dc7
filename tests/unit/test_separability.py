"""Unit tests for the separability measures: prompt-grouped cross-validated probe accuracy, its
permutation null, and the held-out Fisher ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor

import sims_lens.separability as separability_module
import sims_lens.steering.learners as learners
from sims_lens.seeds import derive_seed
from sims_lens.separability import (
    Separability,
    fisher_ratio,
    null_accuracies,
    pair_folds,
    probe_accuracy,
    probe_accuracy_null,
    probe_accuracy_threshold,
    separability,
)
from sims_lens.steering.learners.probe import fit_logistic, logistic_weights


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _two_gaussians(n: int, d: int, shift: float, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n pairs: pos ~ N(shift u, I), neg ~ N(-shift u, I) for a fixed unit ``u``."""
    u = torch.randn(d, generator=_gen(99))
    u = u / u.norm()
    g = _gen(seed)
    return shift * u + torch.randn(n, d, generator=g), -shift * u + torch.randn(n, d, generator=g)


def _chance_band(n_rows: int, z: float = 4.0) -> float:
    """``z`` binomial standard deviations of an accuracy over ``n_rows`` coin flips: the tolerance
    around 0.5 that the sample size allows (CV predictions are mildly correlated; at d = 576, n = 16
    the measured spread is ~1.25x binomial, so z = 4 is still > 3 real standard deviations)."""
    return z * math.sqrt(0.25 / n_rows)


def test_one_home_not_reexported_by_the_learners() -> None:
    for name in ("probe_accuracy", "probe_accuracy_null", "fisher_ratio", "separability"):
        assert not hasattr(learners, name)


# -- folds ------------------------------------------------------------------------------------


def test_pair_folds_keep_each_group_in_one_fold_and_hold_out_every_pair_once() -> None:
    groups = [f"prompt{i // 3}" for i in range(21)]  # 7 prompts, 3 pairs each
    folds = pair_folds(groups, 21, folds=5, seed=4)
    assert len(folds) == 5
    held_out = np.concatenate([test for _, test in folds])
    assert sorted(held_out.tolist()) == list(range(21))
    for train, test in folds:
        assert not {groups[i] for i in train} & {groups[i] for i in test}
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(21))
    assert len(pair_folds(groups, 21, folds=10)) == 7  # never more folds than groups
    assert len(pair_folds(None, 3, folds=5)) == 3  # None: every pair is its own group


# -- (a) grouping -------------------------------------------------------------------------------


def _prompt_specific_contrast(
    n_prompts: int = 16, per_prompt: int = 4, d: int = 64, *, seed: int = 0
) -> tuple[Tensor, Tensor, list[str]]:
    """Each prompt: a strong offset shared by its + and - rows, and its *own* +/- direction.

    Nothing about the preference generalises to a new prompt, so the honest (grouped) accuracy is
    chance; a probe that has seen other pairs of the same prompt can still learn that prompt's
    direction, so a split that ignores the prompts scores high.
    """
    g = _gen(seed)
    offset = 5.0 * torch.randn(n_prompts, 1, d, generator=g)
    direction = torch.randn(n_prompts, 1, d, generator=g)
    direction = 10.0 * direction / direction.norm(dim=-1, keepdim=True)
    pos = offset + direction + torch.randn(n_prompts, per_prompt, d, generator=g)
    neg = offset - direction + torch.randn(n_prompts, per_prompt, d, generator=g)
    groups = [f"prompt{i}" for i in range(n_prompts) for _ in range(per_prompt)]
    return pos.reshape(-1, d), neg.reshape(-1, d), groups


def test_grouping_by_prompt_removes_the_leak_of_prompt_specific_contrast() -> None:
    pos, neg, groups = _prompt_specific_contrast()
    band = _chance_band(2 * pos.shape[0])
    leaky = probe_accuracy(pos, neg)  # prompt_ids=None: each pair its own prompt, other pairs of its prompt train
    grouped = probe_accuracy(pos, neg, groups)
    assert leaky > 0.5 + band
    assert abs(grouped - 0.5) < band
    assert abs(probe_accuracy_null(pos, neg, groups) - 0.5) < band


def _independent_split_accuracy(pos: Tensor, neg: Tensor, seed: int) -> float:
    """The replaced procedure: 30% of each class held out at random, independently of the pairing."""
    rng = np.random.RandomState(seed)
    parts = [train_test_split(np.arange(x.shape[0]), test_size=0.3, random_state=rng) for x in (pos, neg)]
    (pos_train, pos_test), (neg_train, neg_test) = parts
    classifier = fit_logistic(pos[pos_train], neg[neg_train])
    correct = (classifier.logits(pos[pos_test]) > 0).sum() + (classifier.logits(neg[neg_test]) <= 0).sum()
    return float(correct) / (len(pos_test) + len(neg_test))


def test_shared_prompt_offsets_are_chance_when_grouped_but_not_when_pairs_are_split() -> None:
    """A strong prompt offset shared by a pair's + and - rows, noise otherwise (one pair per prompt).

    Splitting the two rows of a pair across train and test lets the probe recognise the prompt
    and label it with the class its training row had, so the held-out row is misclassified (the
    old split scored far *below* chance here); the grouped accuracy is chance.
    """
    g = _gen(3)
    n, d = 128, 256
    offset = 5.0 * torch.randn(n, d, generator=g)
    pos, neg = offset + torch.randn(n, d, generator=g), offset + torch.randn(n, d, generator=g)
    assert abs(probe_accuracy(pos, neg) - 0.5) < _chance_band(2 * n)
    for seed in range(3):  # each split scores 2 x 38 held-out rows
        assert _independent_split_accuracy(pos, neg, seed) < 0.5 - _chance_band(2 * round(0.3 * n))


# -- (b), (c) separable and identical distributions ------------------------------------------


def test_separable_pairs_score_one_and_their_null_is_chance() -> None:
    pos, neg = _two_gaussians(200, 8, 3.0, seed=6)  # Bayes accuracy Phi(3) = 0.9987
    band = _chance_band(2 * 200)
    measured = separability(pos, neg, None, seed=0)
    assert measured.probe_accuracy >= 0.97
    assert abs(measured.probe_accuracy_null - 0.5) < band


def test_identical_distributions_score_chance_and_so_does_the_null() -> None:
    pos, neg = _two_gaussians(200, 8, 0.0, seed=7)
    band = _chance_band(2 * 200)
    measured = separability(pos, neg, None, seed=0)
    assert abs(measured.probe_accuracy - 0.5) < band
    assert abs(measured.probe_accuracy_null - 0.5) < band


def test_high_dimensional_noise_with_few_pairs_stays_near_chance() -> None:
    """The loop's regime (d = 576, 16 pairs): accuracy and null within the sample-size band."""
    g = _gen(11)
    pos, neg = torch.randn(16, 576, generator=g), torch.randn(16, 576, generator=g)
    measured = separability(pos, neg, None, seed=0)
    band = _chance_band(2 * 16)
    assert abs(measured.probe_accuracy - 0.5) < band and abs(measured.probe_accuracy_null - 0.5) < band


# -- (d) held-out Fisher ratio -----------------------------------------------------------------


def _in_sample_fisher(pos: Tensor, neg: Tensor) -> float:
    u = pos.double().mean(0) - neg.double().mean(0)
    u = u / u.norm()
    p, q = pos.double() @ u, neg.double() @ u
    return float((p.mean() - q.mean()) ** 2 / (p.var(unbiased=False) + q.var(unbiased=False)))


def test_held_out_fisher_ratio_of_noise_is_small_and_of_separated_pairs_large() -> None:
    d, n = 576, 16
    g = _gen(12)
    pos, neg = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert _in_sample_fisher(pos, neg) > 0.5 * d / n  # the direction fitted on the same rows: ~d / n = 36
    assert fisher_ratio(pos, neg) < 16 / n  # held out: O(1 / n) (mean ~0.15 over 50 seeds)
    separated_pos, separated_neg = _two_gaussians(n, d, 3.0, seed=12)
    assert fisher_ratio(separated_pos, separated_neg) > 2.0  # ~5 here; its population value is 36 / 2 = 18


def test_fisher_ratio_matches_its_held_out_definition() -> None:
    pos, neg = _two_gaussians(40, 8, 1.0, seed=9)
    groups = [i // 2 for i in range(40)]
    p, q = [], []
    for train, test in pair_folds(groups, 40, folds=5, seed=2):
        u = pos[train].double().mean(0) - neg[train].double().mean(0)
        u = (u / u.norm()).numpy()
        p += list(pos[test].double().numpy() @ u)
        q += list(neg[test].double().numpy() @ u)
    expected = (np.mean(p) - np.mean(q)) ** 2 / (np.var(p) + np.var(q))
    assert math.isclose(fisher_ratio(pos, neg, groups, seed=2), expected, rel_tol=1e-9)
    near_pos, near_neg = _two_gaussians(40, 8, 0.1, seed=9)
    assert fisher_ratio(pos, neg) > 10 * fisher_ratio(near_pos, near_neg)


def test_fisher_ratio_is_zero_for_identical_rows_and_infinite_without_spread() -> None:
    pos, _ = _two_gaussians(10, 4, 1.0)
    assert fisher_ratio(pos, pos.clone()) == 0.0
    pos = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    assert fisher_ratio(pos, neg) == float("inf")


# -- (e) determinism -----------------------------------------------------------------------------


def test_separability_is_deterministic_given_the_seed_and_matches_the_single_measures() -> None:
    pos, neg = _two_gaussians(30, 8, 0.3, seed=1)
    groups = [f"p{i // 2}" for i in range(30)]
    first = separability(pos, neg, groups, seed=3)
    assert isinstance(first, Separability)
    assert separability(pos, neg, groups, seed=3) == first
    assert first == Separability(
        probe_accuracy(pos, neg, groups, seed=3),
        probe_accuracy_null(pos, neg, groups, seed=3),
        fisher_ratio(pos, neg, groups, seed=3),
    )
    assert len({separability(pos, neg, groups, seed=s) for s in range(6)}) > 1
    assert [t.tolist() for _, t in pair_folds(groups, 30, seed=3)] == [
        t.tolist() for _, t in pair_folds(groups, 30, seed=3)
    ]


def test_group_ids_only_matter_through_which_pairs_share_a_prompt() -> None:
    pos, neg = _two_gaussians(12, 4, 0.5, seed=5)
    by_name = separability(pos, neg, [f"p{i // 3}" for i in range(12)], seed=0)
    by_number = separability(pos, neg, [i // 3 for i in range(12)], seed=0)
    assert by_name == by_number


# -- (f) the fast fit is the direct one ---------------------------------------------------------


def _direct_cv(pos: Tensor, neg: Tensor, folds, l2: float = 1e-2) -> tuple[int, int, int]:
    """The former procedure, fold by fold: sklearn's lbfgs on all d standardised features of the training
    folds (a fresh fit per labeling); returns (correct, ambiguous, total) held-out rows, ambiguous = |logit| <
    1e-3 (where two fits equal to solver tolerance may disagree on the sign)."""
    correct = ambiguous = total = 0
    for train, test in folds:
        tr, te = torch.from_numpy(train), torch.from_numpy(test)
        x = torch.cat([pos[tr], neg[tr]]).double()
        y = torch.cat([torch.ones(len(train)), torch.zeros(len(train))]).double()
        mu, sigma = x.mean(0), x.std(0, unbiased=False)
        w, b = logistic_weights((x - mu) / sigma, y, l2=l2, bias=True, max_iter=20_000)
        w_raw, b_raw = w / sigma, b - (mu / sigma) @ w
        for rows, preferred in ((pos[te], True), (neg[te], False)):
            logits = rows.double() @ w_raw + b_raw
            correct += int(((logits > 0) if preferred else (logits <= 0)).sum())
            ambiguous += int((logits.abs() < 1e-3).sum())
        total += 2 * len(test)
    return correct, ambiguous, total


def test_probe_accuracy_and_its_null_equal_the_direct_sklearn_procedure() -> None:
    """The loop's regime (16 pairs, d = 576, 8 prompts): fitting in the span of each fold's rows, all
    labelings of a fold at once, changes no held-out prediction of the former per-fit sklearn procedure."""
    n, d, seed = 16, 576, 4
    pos, neg = _two_gaussians(n, d, 0.5, seed=21)
    groups = [f"p{i // 2}" for i in range(n)]
    folds = pair_folds(groups, n, seed=seed)
    correct, ambiguous, total = _direct_cv(pos, neg, folds)
    assert abs(probe_accuracy(pos, neg, groups, seed=seed) * total - correct) <= ambiguous + 1e-9
    codes = np.array([i // 2 for i in range(n)])
    null_correct = null_ambiguous = 0
    for r in range(5):  # probe_accuracy_null's sign-flip permutations, fitted on the swapped rows
        flip = np.random.default_rng(derive_seed(seed, "null", r)).random(8) < 0.5
        swap = torch.from_numpy(flip[codes])[:, None]
        c, a, _ = _direct_cv(torch.where(swap, neg, pos), torch.where(swap, pos, neg), folds)
        null_correct, null_ambiguous = null_correct + c, null_ambiguous + a
    null = probe_accuracy_null(pos, neg, groups, seed=seed)
    assert abs(null * 5 * total - null_correct) <= null_ambiguous + 1e-6


def test_separability_fits_every_labeling_of_a_fold_on_one_factorisation(monkeypatch) -> None:
    """One fit call per fold for the real labels and the 5 permutations together (what makes it fast)."""
    calls: list[tuple[int, ...]] = []
    fit = separability_module.fit_logistic_labels

    def spy(x, labels, **kwargs):
        calls.append(tuple(labels.shape))
        return fit(x, labels, **kwargs)

    monkeypatch.setattr(separability_module, "fit_logistic_labels", spy)
    pos, neg = _two_gaussians(16, 64, 0.5, seed=3)
    separability(pos, neg, [f"p{i}" for i in range(16)], seed=0)
    assert len(calls) == 5 and all(k == 6 for k, _ in calls)
    assert sum(rows for _, rows in calls) == 2 * 16 * 4  # each pair trains in 4 of the 5 folds


# -- (g) the family-wise threshold over layers ------------------------------------------------


def _layers(n: int = 16, d: int = 6, layers: int = 4, planted: int | None = 2) -> tuple[Tensor, Tensor, list[str]]:
    """``[n, layers, d]`` pairs of noise, but for a separable direction planted in layer ``planted``."""
    g = _gen(40)
    pos, neg = torch.randn(n, layers, d, generator=g), torch.randn(n, layers, d, generator=g)
    if planted is not None:
        pos[:, planted], neg[:, planted] = _two_gaussians(n, d, 3.0, seed=41)
    return pos, neg, [f"p{i // 2}" for i in range(n)]


def test_a_planted_separable_layer_exceeds_the_family_wise_threshold() -> None:
    pos, neg, groups = _layers()
    threshold = probe_accuracy_threshold(pos, neg, groups, seed=0)
    assert 0.5 < threshold < 1.0
    accuracies = [probe_accuracy(pos[:, i], neg[:, i], groups, seed=0) for i in range(4)]
    assert accuracies[2] > threshold
    assert all(a <= threshold for i, a in enumerate(accuracies) if i != 2)  # this seed's noise layers do not


def test_the_threshold_dominates_every_layers_own_null_95th_percentile() -> None:
    """The same permutation relabels every layer (a column of the family's null is the layer's own null)."""
    pos, neg, groups = _layers(planted=None)
    null = null_accuracies(pos, neg, groups, seed=1, permutations=40)
    assert null.shape == (40, 4)
    threshold = probe_accuracy_threshold(pos, neg, groups, seed=1, permutations=40)
    for i in range(4):
        alone = null_accuracies(pos[:, i : i + 1], neg[:, i : i + 1], groups, seed=1, permutations=40)
        assert np.array_equal(alone[:, 0], null[:, i])
        assert threshold >= np.quantile(alone[:, 0], 0.95, method="higher")
    assert threshold == np.quantile(null.max(axis=1), 0.95, method="higher")
    assert threshold > np.quantile(null, 0.95, method="higher", axis=0).min()  # the max is a real correction here
    # its first permutations are probe_accuracy_null's own
    assert np.mean(null[:5, 3]) == separability(pos[:, 3], neg[:, 3], groups, seed=1).probe_accuracy_null


def test_the_threshold_is_deterministic_given_the_seed_and_nan_for_one_prompt() -> None:
    pos, neg, groups = _layers()
    first = probe_accuracy_threshold(pos, neg, groups, seed=3, permutations=30)
    assert probe_accuracy_threshold(pos, neg, groups, seed=3, permutations=30) == first
    assert len({probe_accuracy_threshold(pos, neg, groups, seed=s, permutations=30) for s in range(4)}) > 1
    assert math.isnan(probe_accuracy_threshold(pos, neg, ["one"] * 16, seed=3))
    with pytest.raises(ValueError, match="permutations must be an integer >= 1"):
        null_accuracies(pos, neg, groups, seed=0, permutations=0)
    with pytest.raises(ValueError, match="level must be in"):
        probe_accuracy_threshold(pos, neg, groups, seed=0, level=1.0)
    with pytest.raises(ValueError, match="paired"):
        probe_accuracy_threshold(pos, neg[:, :3], groups, seed=0)


# -- (h) errors ----------------------------------------------------------------------------------


def test_clear_errors_for_bad_prompt_ids_folds_and_inputs() -> None:
    pos, neg = _two_gaussians(6, 4, 1.0)
    for measure in (probe_accuracy, probe_accuracy_null, fisher_ratio):
        with pytest.raises(ValueError, match="at least 2 prompts"):
            measure(pos, neg, ["same"] * 6)
        with pytest.raises(ValueError, match="prompt_ids has 5 entries but there are 6 pairs"):
            measure(pos, neg, ["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="at least 2 prompts"):
        separability(pos, neg, [0] * 6, seed=0)
    with pytest.raises(TypeError, match="one prompt id per pair"):
        separability(pos, neg, "abcdef", seed=0)
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        probe_accuracy(pos, neg, folds=1)
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        probe_accuracy_null(pos, neg, repeats=0)
    with pytest.raises(ValueError, match="paired rows"):
        probe_accuracy(pos, neg[:5])
    with pytest.raises(ValueError, match="differ in d_model"):
        fisher_ratio(pos, neg[:, :3])
    with pytest.raises(ValueError, match="at least 2 rows"):
        separability(pos[:1], neg[:1], None, seed=0)
