"""Unit tests for the separability measures: held-out probe accuracy and Fisher's ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

import sims_lens.steering.learners as learners
from sims_lens.separability import fisher_ratio, probe_accuracy


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _two_gaussians(n: int, d: int, shift: float, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """pos ~ N(shift u, I), neg ~ N(-shift u, I) for a fixed unit ``u``."""
    u = torch.randn(d, generator=_gen(99))
    u = u / u.norm()
    g = _gen(seed)
    return shift * u + torch.randn(n, d, generator=g), -shift * u + torch.randn(n, d, generator=g)


def test_one_home_not_reexported_by_the_learners() -> None:
    assert not hasattr(learners, "probe_accuracy") and not hasattr(learners, "fisher_ratio")


def test_probe_accuracy_separable_vs_identical() -> None:
    pos, neg = _two_gaussians(200, 8, 3.0, seed=6)
    assert probe_accuracy(pos, neg) >= 0.97
    same_pos, _ = _two_gaussians(400, 8, 0.0, seed=7)
    same_neg, _ = _two_gaussians(400, 8, 0.0, seed=8)
    assert abs(probe_accuracy(same_pos, same_neg) - 0.5) < 0.12


def test_probe_accuracy_is_reproducible_and_depends_on_the_seed() -> None:
    pos, neg = _two_gaussians(60, 8, 0.3, seed=1)
    assert probe_accuracy(pos, neg, seed=3) == probe_accuracy(pos, neg, seed=3)
    assert len({probe_accuracy(pos, neg, seed=s) for s in range(6)}) > 1


@pytest.mark.parametrize(
    ("n_pos", "n_neg", "test_fraction", "n_test"),
    [(2, 2, 0.3, 2), (2, 2, 0.9, 2), (10, 10, 0.3, 6), (3, 40, 0.01, 2), (40, 3, 0.99, 41)],
)
def test_probe_accuracy_holds_out_at_least_one_row_per_class(
    n_pos: int, n_neg: int, test_fraction: float, n_test: int
) -> None:
    """``round(n * test_fraction)`` rows of each class, clamped to [1, n - 1], are scored."""
    pos, neg = _two_gaussians(max(n_pos, n_neg), 4, 3.0, seed=2)
    accuracy = probe_accuracy(pos[:n_pos], neg[:n_neg], test_fraction=test_fraction)
    assert 0.0 <= accuracy <= 1.0
    assert math.isclose(accuracy * n_test, round(accuracy * n_test), abs_tol=1e-9)  # a multiple of 1 / n_test


def test_probe_accuracy_rejects_bad_fraction_and_bad_inputs() -> None:
    pos, neg = _two_gaussians(10, 4, 1.0)
    for fraction in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="test_fraction must be in"):
            probe_accuracy(pos, neg, test_fraction=fraction)
    with pytest.raises(ValueError, match="differ in d_model"):
        probe_accuracy(pos, neg[:, :3])
    with pytest.raises(ValueError, match="at least 2 rows"):
        probe_accuracy(pos, neg[:1])


def test_fisher_ratio_matches_definition_and_orders_separation() -> None:
    pos, neg = _two_gaussians(300, 8, 1.0, seed=9)
    u = (pos.double().mean(0) - neg.double().mean(0)).numpy()
    u /= np.linalg.norm(u)
    p, q = pos.double().numpy() @ u, neg.double().numpy() @ u
    expected = (p.mean() - q.mean()) ** 2 / (p.var() + q.var())
    assert math.isclose(fisher_ratio(pos, neg), expected, rel_tol=1e-9)
    near_pos, near_neg = _two_gaussians(300, 8, 0.1, seed=9)
    assert fisher_ratio(pos, neg) > 10 * fisher_ratio(near_pos, near_neg)
    assert fisher_ratio(pos, pos.clone()) == 0.0


def test_fisher_ratio_is_infinite_without_spread() -> None:
    pos = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    assert fisher_ratio(pos, neg) == float("inf")
