"""Unit tests for the Householder pseudo-rotation (HPR) learner and its edit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from sims_lens.steering.functions import (
    SteeringFunction,
    householder_angles,
    hpr_angle,
    hpr_probe_logit,
    hpr_rotation,
)
from sims_lens.steering.learners import HPRLearner

HOOK = "blocks.2.hook_resid_post"
D = 32
ANGLE = 1.2  # radians between the positive and the negative cluster


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plane() -> tuple[Tensor, Tensor]:
    """Orthonormal ``a`` (positive cluster's axis) and ``c`` (the plane negatives are rotated in)."""
    a = torch.randn(D, generator=_gen(123))
    a = a / a.norm()
    c = torch.randn(D, generator=_gen(456))
    c = c - (c @ a) * a
    return a, c / c.norm()


def _rotate(x: Tensor, a: Tensor, c: Tensor, phi: float) -> Tensor:
    """Rotate rows of ``x`` by ``phi`` in the (a, c) plane, from ``a`` toward ``c``."""
    xa, xc = (x @ a).unsqueeze(-1), (x @ c).unsqueeze(-1)
    cos, sin = math.cos(phi), math.sin(phi)
    return x + (cos - 1) * (xa * a + xc * c) + sin * (xa * c - xc * a)


def _shell_pairs(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Position-paired tokens on a shell of radius ~10: y+ near ``a``, y- = y+ rotated by ANGLE."""
    g = _gen(seed)
    a, c = _plane()
    x = a + 0.3 * torch.randn(n, D, generator=g) / math.sqrt(D)
    radius = 10.0 * (1.0 + 0.05 * torch.randn(n, 1, generator=g))
    pos = radius * x / x.norm(dim=-1, keepdim=True)
    return pos, _rotate(pos, a, c, ANGLE)


def _mean_cos(x: Tensor, target: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x, target.expand_as(x), dim=-1).mean())


@pytest.fixture(scope="module")
def fitted() -> SteeringFunction:
    pos, neg = _shell_pairs(600, seed=0)
    return HPRLearner(epochs=20, seed=0).fit(pos, neg, HOOK)


@pytest.fixture(scope="module")
def heldout() -> tuple[Tensor, Tensor]:
    return _shell_pairs(400, seed=1)


def test_returns_raw_space_hpr_parameters(fitted: SteeringFunction) -> None:
    assert (fitted.edit, fitted.learner, fitted.hook) == ("hpr", "hpr", HOOK)
    shapes = {k: tuple(v.shape) for k, v in fitted.params.items()}
    assert shapes == {
        "probe": (D,),
        "mlp_w1": (D, 64),
        "mlp_b1": (64,),
        "mlp_w2": (64, 1),
        "mlp_b2": (1,),
        "max_reach": (),
        "gate_logit": (),
    }
    assert fitted.extra["train_probe_accuracy"] > 0.99


def test_edit_keeps_every_norm(fitted: SteeringFunction, heldout: tuple[Tensor, Tensor]) -> None:
    pos, neg = heldout
    w = fitted.params["probe"]
    # Activations barely on the negative side of the hyperplane: the ill-conditioned case.
    near = torch.randn(200, D, generator=_gen(7)) * 4
    near = near - ((near @ w) / (w @ w) + torch.logspace(-4, 0, 200) / w.norm()).unsqueeze(-1) * w
    assert (hpr_probe_logit(near, fitted.params) < 0).float().mean() > 0.9
    h = torch.cat([pos, neg, near, torch.randn(300, D, generator=_gen(8)) * 7])
    for multiplier in (0.5, 1.0, 3.0):
        edited = fitted(h, multiplier=multiplier)
        torch.testing.assert_close(edited.norm(dim=-1), h.norm(dim=-1), rtol=1e-4, atol=0)
    batched = h[:120].reshape(4, 30, D)
    torch.testing.assert_close(fitted(batched).norm(dim=-1), batched.norm(dim=-1), rtol=1e-4, atol=0)


def test_probe_positive_activations_pass_unchanged(fitted: SteeringFunction, heldout: tuple[Tensor, Tensor]) -> None:
    pos, _ = heldout
    h = torch.cat([pos, torch.randn(500, D, generator=_gen(9)) * 5])
    positive = hpr_probe_logit(h, fitted.params) > 0
    assert positive.sum() > 400
    edited = fitted(h)
    assert torch.equal(edited[positive], h[positive])
    assert not torch.allclose(edited[~positive], h[~positive])


def test_rotation_moves_heldout_negatives_toward_positives(
    fitted: SteeringFunction, heldout: tuple[Tensor, Tensor]
) -> None:
    pos, neg = heldout
    target = pos.mean(0)
    assert (hpr_probe_logit(neg, fitted.params) < 0).float().mean() > 0.95
    rotated = fitted(neg)
    before, after = _mean_cos(neg, target), _mean_cos(rotated, target)
    assert after > before + 0.3
    assert after > _mean_cos(pos, target) - 0.05  # about as close as the positives themselves
    assert (hpr_probe_logit(rotated, fitted.params) > 0).float().mean() > 0.9


def test_angle_mlp_acts_on_raw_activations() -> None:
    """Per-dimension scales and a common offset: the folded-back MLP must still predict the angles."""
    pos, neg = _shell_pairs(600, seed=2)
    scales = torch.logspace(-0.5, 0.5, D)
    fn = HPRLearner(epochs=30, seed=0).fit(pos * scales, neg * scales, HOOK)
    test_pos, test_neg = _shell_pairs(300, seed=3)
    test_pos, test_neg = test_pos * scales, test_neg * scales
    predicted = hpr_angle(test_neg, fn.params)
    true = householder_angles(test_neg, test_pos)
    assert float((predicted - true).abs().mean()) < 0.1
    assert float(hpr_angle(test_pos, fn.params).mean()) < 0.15  # about 0 for positive tokens


def test_multiplier_zero_is_identity(fitted: SteeringFunction, heldout: tuple[Tensor, Tensor]) -> None:
    _, neg = heldout
    h = torch.cat([neg, torch.randn(100, D, generator=_gen(10))])
    torch.testing.assert_close(fitted(h, multiplier=0.0), h, rtol=0, atol=1e-5)
    torch.testing.assert_close(fitted.scaled(0.0)(h), h, rtol=0, atol=1e-5)


def test_deterministic_given_seed() -> None:
    pos, neg = _shell_pairs(200, seed=4)
    a = HPRLearner(epochs=3, seed=5).fit(pos, neg, HOOK)
    b = HPRLearner(epochs=3, seed=5).fit(pos, neg, HOOK)
    c = HPRLearner(epochs=3, seed=6).fit(pos, neg, HOOK)
    for key in a.params:
        assert torch.equal(a.params[key], b.params[key]), key
    assert not torch.equal(a.params["mlp_w1"], c.params["mlp_w1"])


def test_needs_position_paired_tokens() -> None:
    pos, neg = _shell_pairs(20, seed=0)
    with pytest.raises(ValueError, match="paired rows"):
        HPRLearner(epochs=1).fit(pos, neg[:-1], HOOK)
    assert HPRLearner().inputs == "token_pairs"


def test_negatives_cross_to_the_positive_side_and_never_past_the_reflection(
    fitted: SteeringFunction, heldout: tuple[Tensor, Tensor]
) -> None:
    """Default reach 1: a rotation never goes past the reflection; with angle to spare it lands there."""
    _, neg = heldout
    w = fitted.params["probe"]
    reflection = neg - 2 * ((neg @ w) / (w @ w)).unsqueeze(-1) * w
    to_reflection = householder_angles(neg, reflection)
    negative = hpr_probe_logit(neg, fitted.params) < 0
    assert negative.float().mean() > 0.95
    rotated = fitted(neg, multiplier=4.0)  # 4 x the learnt angle: more than any reflection needs
    assert (4.0 * hpr_angle(neg, fitted.params) >= to_reflection)[negative].all()
    torch.testing.assert_close(rotated[negative], reflection[negative], rtol=1e-3, atol=1e-3)  # capped there
    assert (hpr_probe_logit(rotated[negative], fitted.params) > 0).all()  # on the positive side
    for multiplier in (0.3, 1.0, 4.0):
        _, angle = hpr_rotation(neg, fitted.params, multiplier)
        assert (angle <= to_reflection + 1e-4).all()


def test_unbounded_reach_is_the_reference_rotation(heldout: tuple[Tensor, Tensor]) -> None:
    pos, neg = _shell_pairs(600, seed=0)
    reference = HPRLearner(epochs=20, seed=0, max_reach=math.inf).fit(pos, neg, HOOK)
    _, test_neg = heldout
    _, angle = hpr_rotation(test_neg, reference.params, 3.0)
    gated = hpr_probe_logit(test_neg, reference.params) < 0
    torch.testing.assert_close(angle[gated], 3.0 * hpr_angle(test_neg, reference.params)[gated])


def test_gate_probability_rotates_only_confident_negatives(heldout: tuple[Tensor, Tensor]) -> None:
    pos, neg = _shell_pairs(600, seed=0)
    strict = HPRLearner(epochs=2, seed=0, gate_probability=0.05).fit(pos, neg, HOOK)
    h = torch.cat((*heldout, torch.randn(300, D, generator=_gen(11)) * 6))
    gated, _ = hpr_rotation(h, strict.params)
    logit = hpr_probe_logit(h, strict.params)
    assert torch.equal(gated, logit < math.log(0.05 / 0.95))
    assert 0 < int(gated.sum()) < int((logit < 0).sum())
    edited = strict(h)
    assert torch.equal(edited[~gated], h[~gated])


@pytest.mark.parametrize("value", [0.0, -1.0, 0.6, 1.0])
def test_gate_probability_is_validated(value: float) -> None:
    with pytest.raises(ValueError, match="gate_probability"):
        HPRLearner(gate_probability=value)


def test_hpr_defaults_to_steering_generated_positions_only(tiny) -> None:
    """Under "generated" (HPR's default) prompt tokens keep their activations; only the last one is edited."""
    from sims_lens.chat import encode_chat
    from sims_lens.steering.functions import SteeringSet
    from sims_lens.steering.hooks import apply_steering

    model, tok = tiny
    hook = "blocks.0.hook_resid_post"
    g = _gen(3)
    pos, neg = torch.randn(200, 64, generator=g) + 2.0, torch.randn(200, 64, generator=g) - 2.0
    fn = HPRLearner(epochs=2, seed=0).fit(pos, neg, hook)
    ids = torch.tensor([encode_chat(tok, "Tell me a story about the sea please")])
    seen: list[Tensor] = []

    def record(act: Tensor, hook: object) -> None:
        seen.append(act.detach().clone())

    policy = SteeringSet.from_functions([fn.scaled(5.0)], positions=HPRLearner.positions)
    with apply_steering(model, policy), model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", record)]):
        model(ids)
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", record)]):
        model(ids)
    steered, plain = seen
    assert HPRLearner.positions == "generated"
    assert torch.equal(steered[0, :-1], plain[0, :-1])
