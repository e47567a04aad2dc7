"""Logistic-regression probe learner: steer along the normal of a probe separating H+ from H-.

The logistic regressions are scikit-learn's (L2 penalty, lbfgs solver). The separability measures
built on :func:`fit_logistic` live in :mod:`sims_lens.separability`.
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
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2!r}")
    features = x.detach().double().cpu().numpy()
    labels = y.detach().cpu().numpy().astype(np.int64)
    model = LogisticRegression(
        C=1.0 / (l2 * features.shape[0]),
        solver="lbfgs",
        fit_intercept=bias,
        tol=TOLERANCE,
        max_iter=max_iter,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features, labels)
    w = torch.from_numpy(np.ascontiguousarray(model.coef_[0], dtype=np.float64)).to(x.device)
    b = torch.tensor(float(model.intercept_[0]) if bias else 0.0, dtype=torch.float64, device=x.device)
    return w, b


def fit_logistic(
    pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"], *, l2: float = 1e-2, max_iter: int = 200
) -> LinearClassifier:
    """L2-regularised logistic regression of pos (label 1) against neg (label 0), with a bias.

    Fitted on standardised features (per-dimension mean and std of both sets, as with sklearn's
    ``StandardScaler``) so one ``l2`` works across layers whatever their scale, then mapped back
    exactly: ``w_raw = w / sigma``, ``b_raw = b - (mu / sigma) . w``, so the returned classifier
    (and its normal ``w_raw``) acts on raw activations. The penalty ``l2/2 ||w||^2`` is on the
    standardised weights; see :func:`logistic_weights` for the optimiser.
    """
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(pos.shape[0]), torch.zeros(neg.shape[0])]).to(x.device)
    mu = x.mean(dim=0)
    sigma = x.std(dim=0, unbiased=False)
    sigma = torch.where(sigma > 1e-8 * sigma.max().clamp_min(1e-30), sigma, torch.ones_like(sigma))
    w, b = logistic_weights((x - mu) / sigma, y, l2=l2, bias=True, max_iter=max_iter)
    w_raw = w / sigma
    b_raw = b - (mu / sigma) @ w
    return LinearClassifier(weight=w_raw.to(pos.dtype), bias=b_raw.to(pos.dtype))


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
