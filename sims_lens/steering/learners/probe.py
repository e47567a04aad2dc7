"""Logistic-regression probe learner: steer along the normal of a probe separating H+ from H-.

:func:`fit_logistic` (the probe, and the separability measures of :mod:`sims_lens.separability`)
fits its L2-regularised logistic regression in the span of the standardised rows (at most n - 1
dimensions however large d_model is: an exact reformulation, much cheaper when d >> n);
:func:`logistic_weights` fits in the raw features (the HPR probe gate). Both are scikit-learn's
``LogisticRegression`` (L2 penalty, lbfgs solver) on the same objective.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from jaxtyping import Float
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from sims_lens.blas import one_blas_thread
from sims_lens.steering.functions import SteeringFunction
from sims_lens.steering.learners.base import check_activations, register_learner, unit
from sims_lens.steering.learners.mean_diff import mean_difference
from sims_lens.validation import check_int, check_number

TOLERANCE = 1e-8
"""lbfgs gradient tolerance (sklearn's ``tol``, scipy's ``gtol``) on the mean-scaled objective."""


@dataclass(frozen=True)
class LinearClassifier:
    """``logit(h) = h . weight + bias`` in raw activation space (positive means "preferred")."""

    weight: Float[Tensor, " d"]
    bias: Float[Tensor, ""]

    def logits(self, h: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        return h @ self.weight + self.bias


def logistic_weights(
    x: Float[Tensor, "n d"], y: Float[Tensor, " n"], *, l2: float, bias: bool = True, max_iter: int = 200
) -> tuple[Float[Tensor, " d"], Float[Tensor, ""]]:
    """Minimise ``mean BCE(x . w + b, y) + l2/2 ||w||^2`` over ``w`` (and ``b`` if ``bias``).

    scikit-learn's ``LogisticRegression`` (L2, lbfgs solver, intercept unpenalised) minimises
    ``C * sum BCE + 1/2 ||w||^2``, the same objective times ``n`` when ``C = 1 / (l2 * n)``. The
    loss is convex and lbfgs starts from zero, so the result is deterministic and draws no random
    numbers. ``y`` holds labels 0 and 1 (both must occur). Stopping after ``max_iter`` iterations
    without converging is silent (sklearn's ``ConvergenceWarning`` is suppressed), as with a fixed
    iteration budget. Returns float64 ``(w, b)`` on ``x``'s device; ``b`` is 0 without ``bias``.
    """
    w, b = _sklearn_logistic(x.detach().double().cpu().numpy(), y.detach().cpu().numpy(), l2, bias, max_iter)
    return torch.from_numpy(w).to(x.device), torch.tensor(b, dtype=torch.float64, device=x.device)


def _sklearn_logistic(
    features: np.ndarray, y: np.ndarray, l2: float, bias: bool, max_iter: int
) -> tuple[np.ndarray, float]:
    """scikit-learn's L2 logistic regression with ``C = 1 / (l2 n)``: minimises ``mean BCE + l2/2 ||w||^2``."""
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2!r}")
    model = LogisticRegression(
        C=1.0 / (l2 * features.shape[0]), solver="lbfgs", fit_intercept=bias, tol=TOLERANCE, max_iter=max_iter
    )
    with warnings.catch_warnings(), one_blas_thread():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features, np.asarray(y).astype(np.int64))
    w = np.ascontiguousarray(model.coef_[0], dtype=np.float64)
    return w, float(model.intercept_[0]) if bias else 0.0


def fit_logistic(
    pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"], *, l2: float = 1e-2, max_iter: int = 200
) -> LinearClassifier:
    """L2-regularised logistic regression of pos (label 1) against neg (label 0), with a bias.

    Fitted on standardised features (per-dimension mean and std of both sets, as with sklearn's
    ``StandardScaler``) so one ``l2`` works across layers whatever their scale, then mapped back
    exactly: ``w_raw = w / sigma``, ``b_raw = b - (mu / sigma) . w``, so the returned classifier
    (and its normal ``w_raw``) acts on raw activations. It minimises ``mean BCE + l2/2 ||w||^2``,
    the penalty on the standardised weights, as :func:`logistic_weights` does; see
    :func:`fit_logistic_labels` for how.
    """
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(pos.shape[0]), torch.zeros(neg.shape[0])])
    [classifier] = fit_logistic_labels(x, y[None], l2=l2, max_iter=max_iter)
    return LinearClassifier(weight=classifier.weight.to(pos.dtype), bias=classifier.bias.to(pos.dtype))


def fit_logistic_labels(
    x: Float[Tensor, "n d"], labels: Float[Tensor, "k n"], *, l2: float = 1e-2, max_iter: int = 200
) -> list[LinearClassifier]:
    """:func:`fit_logistic` of the rows ``x`` under each of ``k`` labelings (``labels[j, i]`` 1 or 0).

    The rows are standardised once (mean and std over all of them, whatever the labels). The
    penalised optimum's weight lies in the span of the standardised rows ``Z`` (representer theorem:
    at the optimum ``l2 w = -Z^T r / n``, ``r`` the residuals), so with ``V`` an orthonormal basis of
    that span (from the SVD of ``Z``, rank at most ``n``) the problem in ``w = V a`` is the same
    logistic regression on the ``n x rank`` features ``Z V``, with the same penalty
    (``||w|| = ||a||``): an exact reformulation, cheap when ``d >> n``. Each labeling is then fitted
    by :func:`newton_logistic` (all labelings in one batch); the objective is strictly convex, so the
    result is deterministic and free of random numbers.
    The labelings share the factorisation (the separability measures' permutation nulls relabel
    the same rows); each one's fit does not depend on the others. Returns one classifier per
    labeling in raw space, in ``x``'s dtype and on its device.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2!r}")
    targets = labels.detach().double().cpu().numpy()
    if targets.ndim != 2 or targets.shape[1] != x.shape[0]:
        raise ValueError(f"labels must be [k, n] for {x.shape[0]} rows, got shape {tuple(labels.shape)}")
    if not np.isin(targets, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    rows = x.detach().double()
    mu = rows.mean(dim=0)
    sigma = rows.std(dim=0, unbiased=False)
    sigma = torch.where(sigma > 1e-8 * sigma.max().clamp_min(1e-30), sigma, torch.ones_like(sigma))
    if not ((targets.sum(1) > 0) & (targets.sum(1) < targets.shape[1])).all():
        raise ValueError("every labeling needs both labels (1 and 0) among the rows")
    with one_blas_thread():
        features, basis = _span_coordinates(((rows - mu) / sigma).cpu().numpy())
        weights, biases = newton_logistic(features, targets, l2, max_iter)
    classifiers = []
    for a, b in zip(weights, biases, strict=True):
        w = torch.from_numpy(a if basis is None else basis @ a).to(device=x.device)
        w_raw = w / sigma
        b_raw = b - (mu / sigma) @ w
        classifiers.append(LinearClassifier(weight=w_raw.to(x.dtype), bias=b_raw.to(x.dtype)))
    return classifiers


def newton_logistic(
    features: np.ndarray, targets: np.ndarray, l2: float, max_iter: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ``mean BCE(f . a + b, y) + l2/2 ||a||^2`` for every labeling ``y`` of ``targets`` at once.

    Newton's method with backtracking, batched over the ``k`` labelings (float64): the objective is
    smooth and strictly convex in ``a`` and ``b`` jointly when both labels occur, so it converges
    to the same optimum as scikit-learn's lbfgs (:func:`_sklearn_logistic`, tested) until the squared
    Newton decrement (about twice the remaining gap) is below 1e-14, in a few steps and without
    scikit-learn's per-fit overhead (the separability measures fit 30 probes per layer and
    iteration). Returns ``a`` ``[k, r]`` and ``b`` ``[k]``.
    """
    k, n = targets.shape
    design = np.hstack([features, np.ones((n, 1))])  # [n, r + 1]; the bias is the last coordinate
    penalty = np.full(design.shape[1], l2)
    penalty[-1] = 0.0
    theta = np.zeros((k, design.shape[1]))

    def objective(t: np.ndarray) -> np.ndarray:
        z = t @ design.T
        return (np.logaddexp(0.0, z) - targets * z).mean(1) + 0.5 * (penalty * t * t).sum(1)

    value = objective(theta)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (theta @ design.T)))  # a sigmoid that never overflows
        gradient = (p - targets) @ design / n + penalty * theta
        weighted = (p * (1 - p) / n)[:, :, None] * design  # [k, n, r + 1]
        curvature = design.T @ weighted + np.diag(penalty)  # [k, r + 1, r + 1]: sum_n w_kn x_n x_n^T
        step = np.linalg.solve(curvature, gradient[..., None])[..., 0]
        decrease = (gradient * step).sum(1)  # the squared Newton decrement: twice the gap to the optimum, near it
        active = decrease > 1e-14  # converged labelings (gap below 1e-14) stay put
        if not active.any():
            break
        step[~active] = 0.0
        decrease[~active] = 0.0
        scale = np.ones(k)
        for _ in range(40):  # backtracking (Armijo): halve a labeling's step until its objective drops
            trial = theta - scale[:, None] * step
            trial_value = objective(trial)
            worse = active & (trial_value > value - 1e-4 * scale * decrease + 1e-14)  # slack: rounding
            if not worse.any():
                break
            scale = np.where(worse, scale / 2, scale)
        theta, value = trial, trial_value
    return theta[:, :-1], theta[:, -1]


def _span_coordinates(z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(Z V, V)``, ``V`` an orthonormal basis ``[d, rank]`` of the row span of ``z`` (``(z, None)`` if n >= d).

    Directions with singular values below ``max(n, d) * eps`` of the largest (numerically zero, such
    as the one the centring removes) are left out: the rows have no extent along them, so the
    penalty alone sets their weight, to zero.
    """
    n, d = z.shape
    if n >= d:
        return z, None
    _, singular, vt = np.linalg.svd(z, full_matrices=False)
    keep = singular > singular[0] * max(n, d) * np.finfo(np.float64).eps
    basis = np.ascontiguousarray(vt[keep].T)
    return z @ basis, basis


@register_learner("probe")
@dataclass
class ProbeLearner:
    """Steer along the normal of a logistic-regression probe separating H+ from H-.

    ``u = w / ||w||`` with ``w`` the probe's weight in raw activation space (the direction that raises
    the "preferred" logit fastest per unit of norm). The vector is ``u * (u . (mean(pos) - mean(neg)))``:
    the class means' separation along ``u``, i.e. the part of the mean difference the probe's
    direction carries, so at ``m = 1`` it moves the negative mean's projection onto the positive one.

    Settings: ``l2`` (penalty on standardised weights, > 0), ``max_iter`` (lbfgs iterations),
    ``seed`` (accepted for uniform configs with the other trained learners; the convex full-batch
    fit from zero draws no random numbers, so it does not change the result).
    """

    l2: float = 1e-2
    max_iter: int = 200
    seed: int = 0

    name: ClassVar[str] = "probe"
    inputs: ClassVar[str] = "samples"

    def __post_init__(self) -> None:
        check_number(self.name, 0.0, above=True, l2=self.l2)
        check_int(self.name, 1, max_iter=self.max_iter)
        check_int(self.name, 0, seed=self.seed)

    def fit(self, pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"], hook: str) -> SteeringFunction:
        pos, neg = check_activations(pos, neg, learner=self.name)
        classifier = fit_logistic(pos, neg, l2=self.l2, max_iter=self.max_iter)
        u = unit(classifier.weight)
        separation = u @ mean_difference(pos, neg)
        with torch.no_grad():
            correct = (classifier.logits(pos) > 0).sum() + (classifier.logits(neg) <= 0).sum()
        return SteeringFunction(
            edit="add",
            hook=hook,
            params={"vector": separation * u},
            learner=self.name,
            extra={
                "train_accuracy": float(correct) / (pos.shape[0] + neg.shape[0]),
                "separation": float(separation),
                "l2": self.l2,
            },
        )
