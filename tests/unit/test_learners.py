"""Unit tests for the linear steering-function learners, the registry and the input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from sims_lens.steering.functions import SteeringFunction
from sims_lens.steering.learners import (
    LEARNERS,
    AblateAddLearner,
    HPRLearner,
    Learner,
    MeanDiffLearner,
    PCALearner,
    ProbeLearner,
    make_learner,
)
from sims_lens.steering.learners.probe import fit_logistic, fit_logistic_labels, logistic_weights

HOOK = "blocks.3.hook_resid_post"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm()


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _planted(d: int, seed: int = 99) -> Tensor:
    return _unit(torch.randn(d, generator=_gen(seed)))


def _two_gaussians(
    n: int, d: int, shift: float, *, seed: int = 0, offset: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """pos ~ N(offset + shift u, I), neg ~ N(offset - shift u, I); returns (pos, neg, u)."""
    g = _gen(seed)
    u = _planted(d)
    pos = offset + shift * u + torch.randn(n, d, generator=g)
    neg = offset - shift * u + torch.randn(n, d, generator=g)
    return pos, neg, u


# ---------------------------------------------------------------- registry and protocol


def test_registry_names_and_inputs() -> None:
    assert set(LEARNERS) == {"mean_diff", "pca", "probe", "ablate_add", "hpr"}
    expected = {
        "mean_diff": "samples",
        "pca": "samples",
        "probe": "samples",
        "ablate_add": "samples",
        "hpr": "token_pairs",
    }
    for name, inputs in expected.items():
        learner = make_learner(name)
        assert isinstance(learner, Learner)
        assert learner.name == name
        assert learner.inputs == inputs


@pytest.mark.parametrize(
    ("name", "edit"),
    [("mean_diff", "add"), ("pca", "add"), ("probe", "add"), ("ablate_add", "ablate_add"), ("hpr", "hpr")],
)
def test_every_learner_returns_a_usable_steering_function(name: str, edit: str) -> None:
    pos, neg, _ = _two_gaussians(40, 8, 1.0)
    settings = {"epochs": 2} if name == "hpr" else {}
    fn = make_learner(name, **settings).fit(pos, neg, HOOK)
    assert isinstance(fn, SteeringFunction)
    assert (fn.edit, fn.hook, fn.learner, fn.layer) == (edit, HOOK, name, 3)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in fn.params.values())
    h = torch.randn(2, 5, 8, generator=_gen(1))
    assert fn(h).shape == h.shape
    torch.testing.assert_close(fn(h, multiplier=0.0), h)


def test_make_learner_passes_settings() -> None:
    learner = make_learner("probe", l2=0.5, max_iter=7)
    assert isinstance(learner, ProbeLearner)
    assert (learner.l2, learner.max_iter) == (0.5, 7)
    assert make_learner("hpr", hidden=8, seed=3) == HPRLearner(hidden=8, seed=3)


def test_unknown_learner_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown learner 'nope'.*'ablate_add'.*'hpr'.*'mean_diff'.*'pca'.*'probe'"):
        make_learner("nope")


def test_unknown_setting_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rate'\] for learner 'hpr'.*'lr'"):
        make_learner("hpr", learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"\['l2'\] for learner 'mean_diff'; allowed settings: \[\]"):
        make_learner("mean_diff", l2=1.0)


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("hpr", {"lr": 0.0}, "hpr.lr = 0.0 is not allowed; use a finite number > 0"),
        ("hpr", {"epochs": 0}, "hpr.epochs = 0 is not allowed; use an integer >= 1"),
        ("hpr", {"batch_size": 2.5}, "hpr.batch_size = 2.5 is not allowed; use an integer"),
        ("hpr", {"angle_loss_weight": -1.0}, "hpr.angle_loss_weight = -1.0 is not allowed; use a finite number >= 0"),
        ("hpr", {"probe_l2": float("nan")}, "hpr.probe_l2 = nan is not allowed; use a finite number > 0"),
        ("probe", {"l2": -0.1}, "probe.l2 = -0.1 is not allowed; use a finite number > 0"),
        ("probe", {"max_iter": True}, "probe.max_iter = True is not allowed; use an integer"),
    ],
)
def test_invalid_settings_are_rejected_clearly(name: str, settings: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_learner(name, **settings)


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_mismatched_d_model(name: str) -> None:
    with pytest.raises(ValueError, match=r"pos and neg differ in d_model: 8 vs 6"):
        make_learner(name).fit(torch.randn(4, 8), torch.randn(4, 6), HOOK)


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_single_row(name: str) -> None:
    with pytest.raises(ValueError, match=r"neg needs at least 2 rows \(activations\), got 1"):
        make_learner(name).fit(torch.randn(4, 8), torch.randn(1, 8), HOOK)


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_non_finite_values(name: str) -> None:
    pos = torch.randn(4, 8)
    pos[2, 3] = float("nan")
    pos[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"pos contains 2 non-finite \(NaN or inf\) value\(s\)"):
        make_learner(name).fit(pos, torch.randn(4, 8), HOOK)


def test_wrong_rank_and_dtype() -> None:
    with pytest.raises(ValueError, match=r"pos must be 2-D \[n, d_model\], got shape \(8,\)"):
        MeanDiffLearner().fit(torch.randn(8), torch.randn(4, 8), HOOK)
    with pytest.raises(TypeError, match="real floating-point"):
        MeanDiffLearner().fit(torch.ones(4, 8, dtype=torch.long), torch.randn(4, 8), HOOK)


@pytest.mark.parametrize("name", ["pca", "hpr"])
def test_paired_learners_need_equal_rows(name: str) -> None:
    with pytest.raises(ValueError, match=r"paired rows .* got 5 pos and 4 neg rows"):
        make_learner(name).fit(torch.randn(5, 8), torch.randn(4, 8), HOOK)


def test_unpaired_learners_accept_unequal_rows() -> None:
    pos, neg, _ = _two_gaussians(30, 8, 1.0)
    for name in ("mean_diff", "probe", "ablate_add"):
        make_learner(name).fit(pos, neg[:17], HOOK)


# ---------------------------------------------------------------- mean_diff


def test_mean_diff_matches_numpy() -> None:
    g = _gen(3)
    pos = torch.randn(37, 16, generator=g) * 4 + 2
    neg = torch.randn(23, 16, generator=g) * 3 - 1
    fn = MeanDiffLearner().fit(pos, neg, HOOK)
    expected = pos.numpy().astype(np.float64).mean(axis=0) - neg.numpy().astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(fn.params["vector"].numpy(), expected, rtol=0, atol=1e-5)
    assert fn.edit == "add"


def test_mean_diff_accepts_bfloat16() -> None:
    pos, neg, _ = _two_gaussians(20, 8, 1.0)
    fn = MeanDiffLearner().fit(pos.bfloat16(), neg.bfloat16(), HOOK)
    torch.testing.assert_close(fn.params["vector"], pos.bfloat16().float().mean(0) - neg.bfloat16().float().mean(0))


# ---------------------------------------------------------------- pca


def _paired_prompts(n: int, d: int, *, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Each prompt has a large shared activation; y+ adds ``u``, y- subtracts it, plus noise."""
    g = _gen(seed)
    u = _planted(d)
    base = 5.0 * torch.randn(n, d, generator=g)
    pos = base + 0.6 * u + 0.5 * torch.randn(n, d, generator=g)
    neg = base - 0.6 * u + 0.5 * torch.randn(n, d, generator=g)
    return pos, neg, u


def test_pca_recovers_planted_direction_with_neg_to_pos_sign() -> None:
    pos, neg, u = _paired_prompts(300, 32)
    fn = PCALearner().fit(pos, neg, HOOK)
    vector = fn.params["vector"]
    assert _cos(vector, u) > 0.95
    torch.testing.assert_close(vector.norm(), (pos.mean(0) - neg.mean(0)).norm())
    # Swapping the roles flips the direction: the sign always points from neg to pos.
    assert _cos(PCALearner().fit(neg, pos, HOOK).params["vector"], u) < -0.95


def test_pca_is_uncentered_so_consistent_signal_beats_anisotropic_noise() -> None:
    """Differences ``u + noise`` with one noise axis (orthogonal to ``u``) of std 0.8.

    Centered PCA would return that axis (variance 0.64 against ~0.01 along ``u``); the uncentered
    second moment is 1.01 along ``u`` and 0.64 along the noise axis, so ``u`` wins.
    """
    g = _gen(5)
    d = 16
    u = torch.zeros(d)
    u[0] = 1.0
    noise_axis = torch.zeros(d)
    noise_axis[1] = 1.0
    n = 400
    diffs = 1.0 * u + 0.1 * torch.randn(n, d, generator=g) + 0.8 * torch.randn(n, 1, generator=g) * noise_axis
    neg = torch.randn(n, d, generator=g)
    fn = PCALearner().fit(neg + diffs, neg, HOOK)
    assert _cos(fn.params["vector"], u) > 0.95


# ---------------------------------------------------------------- probe


def test_probe_recovers_planted_direction_in_activation_space() -> None:
    """Dimensions have very different scales; the right raw-space normal is ``D^-1 u``."""
    d = 12
    z_pos, z_neg, u = _two_gaussians(400, d, 1.0, seed=4)
    scales = torch.logspace(-1, 1, d)  # 0.1 ... 10
    pos, neg = 3.0 + z_pos * scales, 3.0 + z_neg * scales
    fn = ProbeLearner(l2=1e-3).fit(pos, neg, HOOK)
    vector = fn.params["vector"]
    expected = u / scales
    assert _cos(vector, expected) > 0.95
    assert _cos(vector, u * scales) < 0.9  # a standardised-space weight would point elsewhere
    # The vector is the mean difference's projection onto the probe direction.
    mean_diff = pos.mean(0) - neg.mean(0)
    direction = _unit(vector)
    torch.testing.assert_close(vector, direction * (direction @ mean_diff), atol=1e-5, rtol=1e-5)
    assert fn.extra["train_accuracy"] > 0.8


def test_probe_is_deterministic() -> None:
    pos, neg, _ = _two_gaussians(50, 8, 0.5, seed=2)
    a = ProbeLearner().fit(pos, neg, HOOK).params["vector"]
    b = ProbeLearner().fit(pos, neg, HOOK).params["vector"]
    assert torch.equal(a, b)


def _scaled_offset_case(n_pos: int, n_neg: int, d: int, *, seed: int) -> tuple[Tensor, Tensor]:
    """Overlapping classes (not separable) with per-dimension scales and a common offset."""
    g = _gen(seed)
    u = _planted(d, seed=seed + 1)
    scales = torch.logspace(-1, 1, d)
    pos = 2.0 + (0.4 * u + torch.randn(n_pos, d, generator=g)) * scales
    neg = 2.0 + (-0.4 * u + torch.randn(n_neg, d, generator=g)) * scales
    return pos, neg


@pytest.mark.parametrize("l2", [1e-3, 1e-2, 1.0])
def test_fit_logistic_matches_an_independent_sklearn_pipeline_in_raw_space(l2: float) -> None:
    """StandardScaler + LogisticRegression(C = 1 / (l2 n)) on raw rows gives the same decision function."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pos, neg = _scaled_offset_case(70, 50, 10, seed=21)
    classifier = fit_logistic(pos, neg, l2=l2)
    assert classifier.weight.dtype == torch.float32 and classifier.bias.dtype == torch.float32
    x = torch.cat([pos, neg]).double().numpy()
    y = np.r_[np.ones(70), np.zeros(50)]
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=1000))
    pipeline.fit(x, y)
    probe = torch.randn(40, 10, generator=_gen(22)) * torch.logspace(-1, 1, 10) + 2.0
    expected = pipeline.decision_function(probe.double().numpy())
    np.testing.assert_allclose(classifier.logits(probe).double().numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_logistic_weights_minimise_the_mean_scaled_objective(bias: bool) -> None:
    """The gradient of ``mean BCE + l2/2 ||w||^2`` vanishes at the fit: sklearn's C maps to this scale."""
    l2 = 0.05
    pos, neg = _scaled_offset_case(30, 20, 6, seed=23)
    x = torch.cat([pos, neg]).double() / 3.0
    y = torch.cat([torch.ones(30), torch.zeros(20)]).double()
    w, b = logistic_weights(x, y, l2=l2, bias=bias)
    assert w.dtype == torch.float64 and w.shape == (6,) and b.shape == ()
    if not bias:
        assert float(b) == 0.0
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_(bias)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w @ w)
    grads = torch.autograd.grad(loss, [w, b] if bias else [w])
    assert max(float(g.abs().max()) for g in grads) < 1e-6
    again, _ = logistic_weights(x, y, l2=l2, bias=bias)
    assert torch.equal(again, w.detach())  # deterministic


def test_fit_logistic_matches_the_previous_torch_lbfgs_fit() -> None:
    """Against the hand-written torch LBFGS it replaced (same objective), on a d >> n case."""
    l2 = 1e-2
    g = _gen(31)
    pos = torch.randn(16, 96, generator=g) + 0.3 * _planted(96)
    neg = torch.randn(16, 96, generator=g) - 0.3 * _planted(96)
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(16), torch.zeros(16)]).double()
    mu, sigma = x.mean(0), x.std(0, unbiased=False)
    z = (x - mu) / sigma
    w = torch.zeros(96, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b],
        max_iter=500,
        history_size=20,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    optimizer.step(closure)
    classifier = fit_logistic(pos, neg, l2=l2)
    assert _cos(classifier.weight, w.detach() / sigma) > 1 - 1e-6
    old_bias = b.detach() - (mu / sigma) @ w.detach()
    assert math.isclose(float(classifier.bias), float(old_bias), rel_tol=1e-3, abs_tol=1e-4)


def _direct_sklearn_fit(pos: Tensor, neg: Tensor, l2: float) -> tuple[Tensor, Tensor]:
    """The former ``fit_logistic``: sklearn's lbfgs on all d standardised features, mapped back to raw space."""
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(pos.shape[0]), torch.zeros(neg.shape[0])]).double()
    mu, sigma = x.mean(0), x.std(0, unbiased=False)
    w, b = logistic_weights((x - mu) / sigma, y, l2=l2, bias=True, max_iter=20_000)
    return w / sigma, b - (mu / sigma) @ w


@pytest.mark.parametrize("l2", [1e-3, 1e-2, 1e-1])
def test_the_span_fit_equals_the_direct_sklearn_fit_when_d_exceeds_n(l2: float) -> None:
    """The separability regime (26 training rows, d = 576): solved in the <= 26-dimensional span of the
    standardised rows, the probe is sklearn's fit in all 576 dimensions (representer theorem)."""
    d = 576
    g = _gen(41)
    u, scales = _planted(d, seed=42), torch.logspace(-1, 1, d)
    pos = 1.0 + (0.3 * u + torch.randn(13, d, generator=g)) * scales
    neg = 1.0 + (-0.3 * u + torch.randn(13, d, generator=g)) * scales
    classifier = fit_logistic(pos, neg, l2=l2)
    w, b = _direct_sklearn_fit(pos, neg, l2)
    assert classifier.weight.shape == (d,) and classifier.weight.dtype == torch.float32
    assert _cos(classifier.weight, w) > 0.9999
    probe = 1.0 + torch.randn(40, d, generator=_gen(43)) * scales
    expected = (probe.double() @ w + b).numpy()
    got = classifier.logits(probe).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(expected).max())))


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_the_span_fit_is_the_minimiser_in_all_dimensions(l2: float) -> None:
    """The gradient of ``mean BCE + l2/2 ||w||^2`` over all d standardised weights vanishes at the span fit."""
    d = 300
    g = _gen(44)
    pos = torch.randn(10, d, generator=g, dtype=torch.float64) * 2.0 + 0.5
    neg = torch.randn(12, d, generator=g, dtype=torch.float64) * 2.0 - 0.2
    classifier = fit_logistic(pos, neg, l2=l2)
    assert classifier.weight.dtype == torch.float64
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(10), torch.zeros(12)]).double()
    mu, sigma = x.mean(0), x.std(0, unbiased=False)
    w = (classifier.weight * sigma).clone().requires_grad_()  # the standardised weights and bias
    b = (classifier.bias + mu @ classifier.weight).clone().requires_grad_()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(((x - mu) / sigma) @ w + b, y) + 0.5 * l2 * (w @ w)
    grads = torch.autograd.grad(loss, [w, b])
    assert max(float(grad.abs().max()) for grad in grads) < 1e-7


def test_several_labelings_of_the_same_rows_fit_independently() -> None:
    """What the separability nulls rely on: one call for k labelings gives each labeling's own fit, and
    relabelling pair i's rows is fitting the rows swapped."""
    g = _gen(45)
    x = torch.randn(24, 200, generator=g)
    flips = torch.rand(4, 12, generator=g) < 0.5
    labels = torch.cat([~flips, flips], dim=1).double()  # rows 0-11 are "pos", 12-23 their "neg"
    together = fit_logistic_labels(x, labels, l2=1e-2)
    assert len(together) == 4
    pos, neg = x[:12], x[12:]
    for j in range(4):
        [alone] = fit_logistic_labels(x, labels[j : j + 1], l2=1e-2)
        torch.testing.assert_close(together[j].weight, alone.weight, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(together[j].bias, alone.bias, rtol=1e-9, atol=1e-12)
        swap = flips[j][:, None]
        swapped = fit_logistic(torch.where(swap, neg, pos), torch.where(swap, pos, neg), l2=1e-2)
        assert _cos(together[j].weight, swapped.weight) > 1 - 1e-9
        torch.testing.assert_close(together[j].logits(x), swapped.logits(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="both labels"):
        fit_logistic_labels(x, torch.ones(1, 24))
    with pytest.raises(ValueError, match="labels must be"):
        fit_logistic_labels(x, torch.ones(24))


# ---------------------------------------------------------------- ablate_add


def test_ablate_add_direction_and_edit() -> None:
    d = 16
    g = _gen(11)
    common = 6.0 * _planted(d, seed=1)  # activations share a large mean, as residual streams do
    pos, neg, _ = _two_gaussians(200, d, 1.0, seed=12)
    pos, neg = pos + common, neg + 0.7 * common  # negatives also differ in norm along the common mean
    fn = AblateAddLearner().fit(pos, neg, HOOK)
    u, v = fn.params["ablate"], fn.params["vector"]
    mean_pos, mean_neg = pos.mean(0), neg.mean(0)
    torch.testing.assert_close(v, mean_pos - mean_neg)
    assert math.isclose(float(u.norm()), 1.0, rel_tol=1e-5)
    assert abs(float(u @ _unit(mean_pos))) < 1e-4  # orthogonal to the preferred mean
    assert float(u @ mean_neg) > 0  # points into the dispreferred component
    assert abs(_cos(u, v)) < 0.9  # not just -unit(v)
    h = 3.0 * torch.randn(64, d, generator=g) + common
    edited = fn(h)
    torch.testing.assert_close((edited - v) @ u, torch.zeros(64), atol=1e-4, rtol=0)  # u removed at m=1
    # Orthogonal to u the edit is the plain addition of v.
    rest = (edited - h - v) - ((edited - h - v) @ u).unsqueeze(-1) * u
    torch.testing.assert_close(rest, torch.zeros_like(rest), atol=1e-4, rtol=0)
    torch.testing.assert_close(fn(mean_neg.unsqueeze(0))[0], mean_pos + (v @ u) * u, atol=1e-4, rtol=1e-5)


def test_ablate_add_without_negative_only_component_is_plain_addition() -> None:
    pos = torch.tensor([[2.0, 0.0], [2.2, 0.0]])
    neg = torch.tensor([[1.0, 0.0], [1.2, 0.0]])  # mean(neg) parallel to mean(pos)
    fn = AblateAddLearner().fit(pos, neg, HOOK)
    assert torch.equal(fn.params["ablate"], torch.zeros(2))
    h = torch.randn(3, 2, generator=_gen(0))
    torch.testing.assert_close(fn(h), h + fn.params["vector"])
