"""Update rules (``sims_lens/update_rules.py``): refit, accumulate and ema on steering sets, by hand."""

from __future__ import annotations

import pytest
import torch

from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.update_rules import DEFAULT_RATE, UPDATE_RULES, apply_update

H0, H1, H2 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"
A = torch.tensor([1.0, 2.0, 0.0, -1.0])
B = torch.tensor([0.0, 4.0, 4.0, 0.0])
C = torch.tensor([2.0, -2.0, 6.0, 8.0])
D = torch.tensor([-4.0, 0.0, 2.0, 2.0])


def adds(iteration: int, **vectors: torch.Tensor) -> SteeringSet:
    """An additive set: ``adds(1, h0=v)`` steers blocks.0 by v."""
    hooks = {"h0": H0, "h1": H1, "h2": H2}
    fns = [SteeringFunction("add", hooks[k], {"vector": v.clone()}, iteration=iteration) for k, v in vectors.items()]
    return SteeringSet.from_functions(fns, iteration=iteration)


def directions(steering: SteeringSet) -> dict[str, torch.Tensor]:
    return {hook: steering.direction(hook) for hook in steering.hooks}


def assert_directions(steering: SteeringSet, expected: dict[str, torch.Tensor]) -> None:
    got = directions(steering)
    assert sorted(got) == sorted(expected)
    for hook, vector in expected.items():
        torch.testing.assert_close(got[hook], vector, rtol=0, atol=1e-6)


@pytest.fixture
def previous() -> SteeringSet:
    return adds(2, h0=A, h1=B)


@pytest.fixture
def fitted() -> SteeringSet:
    return adds(3, h0=C, h2=D)


def test_refit_is_the_new_fit_alone(previous, fitted):
    policy = apply_update(previous, fitted, "refit", 0.25)  # refit ignores the rate
    assert_directions(policy, {H0: C, H2: D})
    assert policy.iteration == 3


def test_accumulate_adds_the_scaled_fit_to_the_previous_policy(previous, fitted):
    policy = apply_update(previous, fitted, "accumulate", 0.5)
    # by hand: h0 = A + C / 2, h1 = B (the fit does not steer it), h2 = D / 2 (new)
    expected = {
        H0: torch.tensor([2.0, 1.0, 3.0, 3.0]),
        H1: torch.tensor([0.0, 4.0, 4.0, 0.0]),
        H2: torch.tensor([-2.0, 0.0, 1.0, 1.0]),
    }
    assert_directions(policy, expected)
    assert policy.iteration == 3
    # the two add edits at h0 fold into one vector with multiplier 1: applying it adds that vector
    [fn] = policy.functions[H0]
    assert fn.edit == "add" and fn.multiplier == 1.0
    h = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    torch.testing.assert_close(policy(H0, h), h + expected[H0])
    torch.testing.assert_close(policy(H2, h), h + expected[H2])


def test_ema_decays_the_previous_policy(previous, fitted):
    policy = apply_update(previous, fitted, "ema", 0.25)
    # by hand: h0 = 0.75 A + 0.25 C, h1 = 0.75 B, h2 = 0.25 D
    expected = {
        H0: torch.tensor([1.25, 1.0, 1.5, 1.25]),
        H1: torch.tensor([0.0, 3.0, 3.0, 0.0]),
        H2: torch.tensor([-1.0, 0.0, 0.5, 0.5]),
    }
    assert_directions(policy, expected)
    assert policy.iteration == 3
    h = torch.zeros(2, 4)
    torch.testing.assert_close(policy(H1, h), h + expected[H1])


def test_ema_over_three_iterations_weighs_older_fits_geometrically():
    r = 0.5
    fits = [adds(t, h0=v) for t, v in enumerate([A, B, C], start=1)]
    policy = None
    for fit in fits:
        policy = apply_update(policy, fit, "ema", r)
    # pi_1 = A, pi_2 = A / 2 + B / 2, pi_3 = A / 4 + B / 4 + C / 2
    assert policy is not None and policy.iteration == 3
    assert_directions(policy, {H0: torch.tensor([1.25, 0.5, 4.0, 3.75])})


@pytest.mark.parametrize("rule", UPDATE_RULES)
def test_the_first_policy_is_the_first_fit_under_every_rule(rule, fitted):
    policy = apply_update(None, fitted, rule, 0.25)
    assert_directions(policy, {H0: C, H2: D})
    assert policy.iteration == 3


def test_multipliers_fold_into_the_sums(previous):
    """The fit comes already scaled by ``multiplier``: its functions' multipliers count."""
    fitted = SteeringSet.from_functions(
        [SteeringFunction("add", H0, {"vector": C.clone()}, multiplier=2.0)], iteration=3
    )
    policy = apply_update(previous, fitted, "accumulate", 0.5)
    assert_directions(policy, {H0: A + C, H1: B})  # A + 0.5 * 2 * C


@pytest.mark.parametrize("rule", UPDATE_RULES)
def test_an_update_leaves_the_previous_policy_and_the_fit_as_they_were(rule, previous, fitted):
    apply_update(previous, fitted, rule, 0.25)
    assert previous.iteration == 2 and fitted.iteration == 3
    assert_directions(previous, {H0: A, H1: B})
    assert_directions(fitted, {H0: C, H2: D})
    assert all(fn.multiplier == 1.0 for fn in [*previous, *fitted])


def _ablate_add(hook: str, u: torch.Tensor, v: torch.Tensor, iteration: int) -> SteeringSet:
    fn = SteeringFunction("ablate_add", hook, {"ablate": u, "vector": v}, iteration=iteration)
    return SteeringSet.from_functions([fn], iteration=iteration)


@pytest.mark.parametrize(
    ("rule", "rate", "m_prev", "m_fit"), [("accumulate", 0.5, 1.0, 0.5), ("ema", 0.25, 0.75, 0.25)]
)
def test_non_additive_edits_are_chained_in_order(rule, rate, m_prev, m_fit):
    u1, v1 = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0, 0.0])
    u2, v2 = torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 4.0, 0.0])
    policy = apply_update(_ablate_add(H0, u1, v1, 1), _ablate_add(H0, u2, v2, 2), rule, rate)
    assert [(fn.edit, fn.multiplier) for fn in policy.functions[H0]] == [("ablate_add", m_prev), ("ablate_add", m_fit)]
    assert policy.iteration == 2

    def edit(h, u, v, m):  # h' = h + m (v - (h . u) u)
        return h + m * (v - (h @ u) * u)

    h = torch.tensor([3.0, 5.0, 7.0, 11.0])
    expected = edit(edit(h, u1, v1, m_prev), u2, v2, m_fit)  # the previous policy's edit first
    torch.testing.assert_close(policy(H0, h), expected)
    other_order = edit(edit(h, u2, v2, m_fit), u1, v1, m_prev)
    assert not torch.allclose(expected, other_order)  # so the order is really checked


def test_an_unknown_rule_is_refused(previous, fitted):
    with pytest.raises(ValueError, match=r"unknown update rule 'sum'; use one of \['refit', 'accumulate', 'ema'\]"):
        apply_update(previous, fitted, "sum", 1.0)
    with pytest.raises(ValueError, match="unknown update rule"):
        apply_update(None, fitted, "sum", 1.0)  # even for the first policy


def test_default_rates():
    assert UPDATE_RULES == ("refit", "accumulate", "ema")
    assert DEFAULT_RATE == {"refit": 1.0, "accumulate": 1.0, "ema": 0.5}
