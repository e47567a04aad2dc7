"""Logistic-regression probe: a steering direction, and separability measures for analysis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.steering.functions import SteeringFunction
from sims_lens.steering.learners.base import (
    check_activations,
    check_int,
    check_positive,
    register_learner,
    unit,
)
from sims_lens.steering.learners.mean_diff import mean_difference


@dataclass(frozen=True)
class LinearClassifier:
    """``logit(h) = h . weight + bias`` in raw activation space (positive means "preferred")."""

    weight: Float[Tensor, " d"]
    bias: Float[Tensor, ""]

    def logits(self, h: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        return h @ self.weight + self.bias


def logistic_lbfgs(
    x: Float[Tensor, "n d"], y: Float[Tensor, " n"], *, l2: float, bias: bool = True, max_iter: int = 200
) -> tuple[Float[Tensor, " d"], Float[Tensor, ""]]:
    """Minimise ``mean BCE(x . w + b, y) + l2/2 ||w||^2`` over ``w`` (and ``b`` if ``bias``).

    Full-batch LBFGS (strong-Wolfe line search) from zero, in float64: the loss is convex, so the
    result is deterministic and draws no random numbers. Returns float64 ``(w, b)``; ``b`` is 0
    without ``bias``.
    """
    x = x.double()
    y = y.to(x)
    w = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=bias)
    optimizer = torch.optim.LBFGS(
        [w, b] if bias else [w],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def fit_logistic(
    pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"], *, l2: float = 1e-2, max_iter: int = 200
) -> LinearClassifier:
    """L2-regularised logistic regression of pos (label 1) against neg (label 0), with a bias.

    Fitted on standardised features (per-dimension mean and std of both sets, as with sklearn's
    ``StandardScaler``) so one ``l2`` works across layers whatever their scale, then mapped back
    exactly: ``w_raw = w / sigma``, ``b_raw = b - (mu / sigma) . w``, so the returned classifier
    (and its normal ``w_raw``) acts on raw activations. The penalty ``l2/2 ||w||^2`` is on the
    standardised weights; see :func:`logistic_lbfgs` for the optimiser.
    """
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(pos.shape[0]), torch.zeros(neg.shape[0])])
    mu = x.mean(dim=0)
    sigma = x.std(dim=0, unbiased=False)
    sigma = torch.where(sigma > 1e-8 * sigma.max().clamp_min(1e-30), sigma, torch.ones_like(sigma))
    w, b = logistic_lbfgs((x - mu) / sigma, y, l2=l2, bias=True, max_iter=max_iter)
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

    Settings: ``l2`` (penalty on standardised weights, > 0), ``max_iter`` (LBFGS iterations),
    ``seed`` (accepted for uniform configs with the other trained learners; the convex full-batch
    fit from zero draws no random numbers, so it does not change the result).
    """

    l2: float = 1e-2
    max_iter: int = 200
    seed: int = 0

    name: ClassVar[str] = "probe"
    aggregation: ClassVar[str] = "mean"

    def __post_init__(self) -> None:
        check_positive(self, l2=self.l2)
        check_int(self, 1, max_iter=self.max_iter)
        check_int(self, 0, seed=self.seed)

    def fit(self, pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"], hook: str) -> SteeringFunction:
        pos, neg = check_activations(pos, neg, learner=self.name)
        classifier = fit_logistic(pos, neg, l2=self.l2, max_iter=self.max_iter)
        u = unit(classifier.weight)
        separation = u @ mean_difference(pos, neg)
        with torch.no_grad():
            correct = (classifier.logits(pos) > 0).sum() + (classifier.logits(neg) <= 0).sum()
        return SteeringFunction(
            kind="add",
            hook=hook,
            params={"vector": separation * u},
            learner=self.name,
            extra={
                "train_accuracy": float(correct) / (pos.shape[0] + neg.shape[0]),
                "separation": float(separation),
                "l2": self.l2,
            },
        )


def probe_accuracy(
    pos: Float[Tensor, "n_pos d"],
    neg: Float[Tensor, "n_neg d"],
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    l2: float = 1e-2,
) -> float:
    """Held-out accuracy of a logistic probe separating pos from neg (0.5 = chance).

    Each class is split at random (``seed``) into train and test parts, ``test_fraction`` of it (at
    least one row) held out; the probe is fitted on the train parts and scored on the test parts.
    Used to rank layers by how linearly separable H+ and H- are.
    """
    pos, neg = check_activations(pos, neg, learner="probe_accuracy")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"probe_accuracy: test_fraction must be in (0, 1), got {test_fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    splits = []
    for x in (pos, neg):
        n = x.shape[0]
        n_test = min(n - 1, max(1, round(n * test_fraction)))
        order = torch.randperm(n, generator=generator).to(x.device)
        splits.append((x[order[n_test:]], x[order[:n_test]]))
    (pos_train, pos_test), (neg_train, neg_test) = splits
    classifier = fit_logistic(pos_train, neg_train, l2=l2)
    with torch.no_grad():
        correct = (classifier.logits(pos_test) > 0).sum() + (classifier.logits(neg_test) <= 0).sum()
    return float(correct) / (pos_test.shape[0] + neg_test.shape[0])


def fisher_ratio(pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"]) -> float:
    """Fisher's criterion along the mean-difference direction ``u``.

    ``(mean(pos . u) - mean(neg . u))^2 / (var(pos . u) + var(neg . u))``: between-class over
    within-class variance of the 1-D projections. 0 when the means coincide, ``inf`` when the
    classes differ but have no spread along ``u``.
    """
    pos, neg = check_activations(pos, neg, learner="fisher_ratio")
    u = unit(mean_difference(pos.double(), neg.double()))
    if not bool(u.any()):
        return 0.0
    p, q = pos.double() @ u, neg.double() @ u
    between = float((p.mean() - q.mean()) ** 2)
    within = float(p.var(unbiased=False) + q.var(unbiased=False))
    if within <= 1e-300:
        return float("inf")
    return between / within
