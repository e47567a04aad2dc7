"""How separable H+ and H- are at one hook: cross-validated probe accuracy, its null, Fisher's ratio.

The one home of these measures: the loop ranks layers by :func:`probe_accuracy` (``layers =
"top:K"``) and logs :func:`separability` per layer; ``analysis.separability`` tabulates them.

Every measure is cross-validated over folds of *prompts*. ``pos[i]`` and ``neg[i]`` are the two
responses of one pair, and ``prompt_ids[i]`` names its prompt: all rows of a prompt go to the same
fold (:func:`pair_folds`), so what is scored is always a prompt the probe or direction never saw.

Speed (every observed layer is measured every iteration): a permutation of the null only relabels
the training fold's rows, so per fold the probes of the real labels and of every permutation share
one standardisation and one factorisation
(:func:`~sims_lens.steering.learners.probe.fit_logistic_labels`), each fitted exactly in the span of
the fold's rows.

Significance across layers (:func:`probe_accuracy_threshold`): the best of ~30 layers' accuracies
beats its own null by chance alone, so a layer counts as readable only above the 95th percentile
of the *maximum over layers* of the permutation-null accuracy, each permutation relabelling every
layer alike (a family-wise null).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from sklearn.model_selection import GroupKFold
from torch import Tensor

from sims_lens.seeds import derive_seed
from sims_lens.steering.learners.base import check_activations, unit
from sims_lens.steering.learners.mean_diff import mean_difference
from sims_lens.steering.learners.probe import fit_logistic_labels

PromptIds = Sequence[Hashable] | None
"""``prompt_ids[i]``: the prompt (any hashable id) of pair ``i``; ``None``: every pair is its own prompt."""

Folds = list[tuple[np.ndarray, np.ndarray]]
"""``(train, test)`` arrays of pair indices, one entry per fold."""

THRESHOLD_PERMUTATIONS = 100
"""Sign-flip permutations behind :func:`probe_accuracy_threshold` (its 95th percentile is then the 96th of 100)."""
THRESHOLD_LEVEL = 0.95
"""The quantile :func:`probe_accuracy_threshold` takes: pure noise puts any layer above it about 5% of the time."""


@dataclass(frozen=True)
class Separability:
    """The three separability measures of one hook, computed on the same prompt-grouped folds."""

    probe_accuracy: float
    """Cross-validated accuracy of a logistic probe (pooled over all held-out rows)."""
    probe_accuracy_null: float
    """The same on label-permuted data (pairs' + and - swapped per prompt at random): the chance level."""
    fisher_ratio: float
    """Fisher's criterion of the held-out rows along the training folds' mean difference."""


def pair_folds(
    prompt_ids: PromptIds, n_pairs: int, *, folds: int = 5, seed: int = 0, name: str = "separability"
) -> Folds:
    """K-fold split of ``n_pairs`` pairs in which all pairs of a group (prompt) share one fold.

    The group labels are first renamed by a permutation drawn from ``derive_seed(seed, "folds")``
    (so which prompts share a fold changes with the seed, reproducibly), then split by
    scikit-learn's ``GroupKFold`` into ``min(folds, number of prompts)`` folds of balanced size (in
    rows). Every group holds as many pos as neg rows, so every fold is class-balanced. Needs pairs
    from at least 2 prompts.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"{name}: folds must be an integer >= 2, got {folds!r}")
    codes = _prompt_codes(prompt_ids, n_pairs, name)
    n_groups = int(codes.max()) + 1
    if n_groups < 2:
        raise ValueError(f"{name}: needs pairs from at least 2 prompts to hold one out, got {n_groups}")
    relabel = np.random.default_rng(derive_seed(seed, "folds")).permutation(n_groups)
    splitter = GroupKFold(n_splits=min(folds, n_groups))
    return [(train, test) for train, test in splitter.split(np.zeros(n_pairs), groups=relabel[codes])]


def probe_accuracy(
    pos: Float[Tensor, "n d"],
    neg: Float[Tensor, "n d"],
    prompt_ids: PromptIds = None,
    *,
    folds: int = 5,
    seed: int = 0,
    l2: float = 1e-2,
) -> float:
    """Cross-validated accuracy of a logistic probe separating pos from neg, grouped by prompt (0.5 = chance).

    K-fold cross-validation over :func:`pair_folds`: the probe
    (:func:`~sims_lens.steering.learners.probe.fit_logistic`, penalty ``l2``) is fitted on the
    training folds and scores the held-out fold's rows; the accuracy is pooled over every held-out
    row (correct / rows). Grouping matters because a prompt's two responses share most of their
    activation (the prompt's own offset): with one on each side of the split the probe scores the
    prompt instead of the preference, which pushes the accuracy away from chance on noise (below it
    with one pair per prompt, above it with several). Compare with :func:`probe_accuracy_null`.
    """
    pos, neg = check_activations(pos, neg, paired=True, learner="probe_accuracy")
    splits = pair_folds(prompt_ids, pos.shape[0], folds=folds, seed=seed, name="probe_accuracy")
    [accuracy] = _cv_accuracies(pos, neg, splits, l2, np.zeros((1, pos.shape[0]), dtype=bool))
    return accuracy


def probe_accuracy_null(
    pos: Float[Tensor, "n d"],
    neg: Float[Tensor, "n d"],
    prompt_ids: PromptIds = None,
    *,
    folds: int = 5,
    seed: int = 0,
    repeats: int = 5,
    l2: float = 1e-2,
) -> float:
    """:func:`probe_accuracy` of label-permuted data, averaged over ``repeats`` permutations.

    Each permutation swaps the pos and neg rows of every group (prompt) independently with
    probability 1/2: a sign-flip permutation that keeps the pairing and the folds, so it has the
    same prompts, sizes and dimension but no consistent preference direction. With a few pairs in
    hundreds of dimensions the accuracy scatters widely around 0.5; this is the chance level the
    same data and folds give, the reference an accuracy should beat. Permutation ``r`` draws from
    ``derive_seed(seed, "null", r)``.
    """
    name = "probe_accuracy_null"
    pos, neg = check_activations(pos, neg, paired=True, learner=name)
    splits = pair_folds(prompt_ids, pos.shape[0], folds=folds, seed=seed, name=name)
    flips = _null_flips(_prompt_codes(prompt_ids, pos.shape[0], name), seed, repeats)
    return float(np.mean(_cv_accuracies(pos, neg, splits, l2, flips)))


def fisher_ratio(
    pos: Float[Tensor, "n d"],
    neg: Float[Tensor, "n d"],
    prompt_ids: PromptIds = None,
    *,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Held-out Fisher's criterion along the mean-difference direction, cross-validated by prompt.

    For each fold of :func:`pair_folds`, ``u`` is the unit mean difference of the *training* folds
    and the held-out rows are projected on it; over the pooled held-out projections ``p`` (pos) and
    ``q`` (neg) the ratio is ``(mean(p) - mean(q))^2 / (var(p) + var(q))``, between- over
    within-class variance. Held out because the direction fitted on the same rows always finds a
    spread-out separation: in-sample the ratio of pure noise is about ``d / n`` (~36 at d = 576,
    n = 16), held out it is about ``1 / n``. 0 when the means coincide, ``inf`` when they differ
    with no spread.
    """
    pos, neg = check_activations(pos, neg, paired=True, learner="fisher_ratio")
    return _cv_fisher(pos, neg, pair_folds(prompt_ids, pos.shape[0], folds=folds, seed=seed, name="fisher_ratio"))


def separability(
    pos: Float[Tensor, "n d"],
    neg: Float[Tensor, "n d"],
    prompt_ids: PromptIds,
    *,
    seed: int,
    folds: int = 5,
    repeats: int = 5,
    l2: float = 1e-2,
) -> Separability:
    """:func:`probe_accuracy`, :func:`probe_accuracy_null` and :func:`fisher_ratio` on the same folds.

    ``prompt_ids[i]`` is the prompt of pair ``(pos[i], neg[i])`` (``None``: one prompt per pair). The
    values equal the three functions' with the same ``prompt_ids``, ``folds``, ``seed`` (and ``l2``,
    ``repeats``).
    """
    pos, neg = check_activations(pos, neg, paired=True, learner="separability")
    codes = _prompt_codes(prompt_ids, pos.shape[0], "separability")
    splits = pair_folds(prompt_ids, pos.shape[0], folds=folds, seed=seed)
    real = np.zeros((1, pos.shape[0]), dtype=bool)
    accuracy, *null = _cv_accuracies(pos, neg, splits, l2, np.concatenate([real, _null_flips(codes, seed, repeats)]))
    return Separability(
        probe_accuracy=accuracy,
        probe_accuracy_null=float(np.mean(null)),
        fisher_ratio=_cv_fisher(pos, neg, splits),
    )


def separability_by_hook(
    positives: Float[Tensor, "n_pairs n_hooks d_model"],
    negatives: Float[Tensor, "n_pairs n_hooks d_model"],
    hooks: Sequence[str],
    prompt_ids: Sequence[Hashable] | None,
    *,
    seed: int,
) -> dict[str, Separability]:
    """:func:`separability` at every hook: the one tabulation the loop's metrics and analysis share.

    ``prompt_ids[i]`` is the prompt of pair ``i`` (None: one prompt per pair). With fewer than 2
    prompts nothing can be held out by prompt, so every value is NaN.
    """
    _check_by_hook(positives, negatives, len(hooks))
    if prompt_ids is not None and len(set(prompt_ids)) < 2:
        return dict.fromkeys(hooks, Separability(math.nan, math.nan, math.nan))
    return {hook: separability(positives[:, i], negatives[:, i], prompt_ids, seed=seed) for i, hook in enumerate(hooks)}


def null_accuracies(
    positives: Float[Tensor, "n_pairs n_hooks d_model"],
    negatives: Float[Tensor, "n_pairs n_hooks d_model"],
    prompt_ids: PromptIds,
    *,
    seed: int,
    permutations: int = THRESHOLD_PERMUTATIONS,
    folds: int = 5,
    l2: float = 1e-2,
) -> Float[np.ndarray, "permutations n_hooks"]:
    """``[permutations, n_hooks]``: :func:`probe_accuracy` at every hook under each sign-flip permutation.

    Permutation ``r`` is the one :func:`probe_accuracy_null` draws (``derive_seed(seed, "null", r)``,
    so its first ``repeats`` rows average to that null) and relabels the pairs of *every* hook alike:
    a row is one draw of the whole family of hooks under "no preference", the distribution the
    maximum over hooks needs. The folds are :func:`pair_folds`' for ``seed``, as everywhere here.
    """
    _check_by_hook(positives, negatives)
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"null_accuracies: permutations must be an integer >= 1, got {permutations!r}")
    n_pairs = positives.shape[0]
    splits = pair_folds(prompt_ids, n_pairs, folds=folds, seed=seed, name="null_accuracies")
    flips = _null_flips(_prompt_codes(prompt_ids, n_pairs, "null_accuracies"), seed, permutations)
    columns = []
    for i in range(positives.shape[1]):
        pos, neg = check_activations(positives[:, i], negatives[:, i], paired=True, learner="null_accuracies")
        columns.append(_cv_accuracies(pos, neg, splits, l2, flips))
    return np.array(columns, dtype=np.float64).reshape(positives.shape[1], permutations).T


def probe_accuracy_threshold(
    positives: Float[Tensor, "n_pairs n_hooks d_model"],
    negatives: Float[Tensor, "n_pairs n_hooks d_model"],
    prompt_ids: PromptIds,
    *,
    seed: int,
    permutations: int = THRESHOLD_PERMUTATIONS,
    level: float = THRESHOLD_LEVEL,
    folds: int = 5,
    l2: float = 1e-2,
) -> float:
    """The 95% family-wise permutation threshold of probe accuracy over a set of hooks (max over layers).

    Per permutation of :func:`null_accuracies` the best accuracy over the hooks, then the ``level``
    quantile of those maxima (``method="higher"``: an attained value, the conservative side). A
    hook whose :func:`probe_accuracy` exceeds it is linearly readable at family-wise level
    ``1 - level``: pure noise at every hook puts *any* hook above it in about 5% of data sets,
    where each hook's own null 95th percentile would often be beaten by one of 30 noise
    layers (with 16 pairs one layer's null spreads by about 0.1 around 0.5). NaN with fewer
    than 2 prompts (nothing can be held out by prompt), as in :func:`separability_by_hook`.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"probe_accuracy_threshold: level must be in (0, 1), got {level!r}")
    _check_by_hook(positives, negatives)
    if positives.shape[1] == 0 or (prompt_ids is not None and len(set(prompt_ids)) < 2):
        return math.nan
    null = null_accuracies(positives, negatives, prompt_ids, seed=seed, permutations=permutations, folds=folds, l2=l2)
    return float(np.quantile(null.max(axis=1), level, method="higher"))


def _check_by_hook(positives: Tensor, negatives: Tensor, n_hooks: int | None = None) -> None:
    """``positives`` and ``negatives`` are ``[n_pairs, n_hooks, d_model]`` alike (any ``n_hooks`` if None)."""
    hooks_ok = positives.ndim == 3 and (n_hooks is None or positives.shape[1] == n_hooks)
    if not hooks_ok or positives.shape != negatives.shape:
        hooks = "n" if n_hooks is None else n_hooks
        raise ValueError(
            f"positives and negatives must be paired [n_pairs, {hooks} hooks, d_model] alike, got "
            f"{tuple(positives.shape)} and {tuple(negatives.shape)}"
        )


def _prompt_codes(prompt_ids: PromptIds, n_pairs: int, name: str) -> np.ndarray:
    """Prompt ids as integers 0.. in order of first appearance (``None``: ``0 .. n_pairs - 1``)."""
    if prompt_ids is None:
        return np.arange(n_pairs)
    if isinstance(prompt_ids, (str, bytes)):
        raise TypeError(
            f"{name}: prompt_ids must be a sequence with one prompt id per pair, got a {type(prompt_ids).__name__}"
        )
    labels = list(prompt_ids)
    if len(labels) != n_pairs:
        raise ValueError(
            f"{name}: prompt_ids has {len(labels)} entries but there are {n_pairs} pairs (one id per pair)"
        )
    index: dict[Hashable, int] = {}
    return np.array([index.setdefault(label, len(index)) for label in labels], dtype=np.int64)


def _rows(x: Tensor, indices: np.ndarray) -> Tensor:
    return x[torch.from_numpy(indices).to(x.device)]


def _cv_accuracies(pos: Tensor, neg: Tensor, folds: Folds, l2: float, flips: np.ndarray) -> list[float]:
    """Cross-validated probe accuracy under each labeling ``flips[j]`` (``[k, n_pairs]``, bool).

    In labeling ``j`` the rows of pair ``i`` swap labels where ``flips[j, i]`` (``neg[i]`` is then the
    preferred one): the same as fitting and scoring ``torch.where(swap, neg, pos)`` against
    ``torch.where(swap, pos, neg)``. Per fold every labeling's probe is fitted on the same rows
    (``fit_logistic_labels``) and scores the held-out fold's rows: correct when ``logit > 0`` for a
    preferred row and ``logit <= 0`` for the other; the accuracy is pooled over every held-out row.
    """
    n = pos.shape[0]
    x = torch.cat([pos, neg])
    preferred = np.concatenate([~flips, flips], axis=1)  # [k, 2 n]: row i is pos[i], row n + i is neg[i]
    labels = torch.from_numpy(preferred.astype(np.float64))
    correct = np.zeros(len(flips), dtype=np.int64)
    total = 0
    for train, test in folds:
        fit_rows, test_rows = np.concatenate([train, train + n]), np.concatenate([test, test + n])
        classifiers = fit_logistic_labels(_rows(x, fit_rows), labels[:, torch.from_numpy(fit_rows)], l2=l2)
        held_out = _rows(x, test_rows)
        with torch.no_grad():
            for j, classifier in enumerate(classifiers):
                predicted = (classifier.logits(held_out) > 0).cpu().numpy()
                correct[j] += int((predicted == preferred[j, test_rows]).sum())
        total += len(test_rows)
    return [int(c) / total for c in correct]


def _null_flips(codes: np.ndarray, seed: int, repeats: int) -> np.ndarray:
    """``[repeats, n_pairs]``: permutation ``r`` swaps a group's pairs with probability 1/2 (``(seed, "null", r)``)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"probe_accuracy_null: repeats must be an integer >= 1, got {repeats!r}")
    n_groups = int(codes.max()) + 1
    return np.stack(
        [np.random.default_rng(derive_seed(seed, "null", r)).random(n_groups)[codes] < 0.5 for r in range(repeats)]
    )


def _cv_fisher(pos: Tensor, neg: Tensor, folds: Folds) -> float:
    p_parts, q_parts = [], []
    for train, test in folds:
        u = unit(mean_difference(_rows(pos, train).double(), _rows(neg, train).double()))
        p_parts.append(_rows(pos, test).double() @ u)
        q_parts.append(_rows(neg, test).double() @ u)
    p, q = torch.cat(p_parts), torch.cat(q_parts)
    between = float((p.mean() - q.mean()) ** 2)
    within = float(p.var(unbiased=False) + q.var(unbiased=False))
    if within <= 1e-300:
        return float("inf") if between > 0.0 else 0.0
    return between / within
