"""Update rules: how an iteration's fitted steering combines with the previous policy.

The paper leaves this open (ARCHITECTURE.md, "Update rules"); the ``update`` setting picks one:

- ``refit``: pi_t = fit_t (the new fit alone);
- ``accumulate``: pi_t = pi_{t-1} + rate * fit_t;
- ``ema``: pi_t = (1 - rate) * pi_{t-1} + rate * fit_t.

Sums and scalings are those of :class:`~sims_lens.steering.functions.SteeringSet` (per-hook vector
sums for additive edits; chained functions for non-additive ones such as HPR).
"""

from __future__ import annotations

from sims_lens.steering.functions import SteeringSet

UPDATE_RULES = ("refit", "accumulate", "ema")
DEFAULT_RATE = {"refit": 1.0, "accumulate": 1.0, "ema": 0.5}
"""The ``update_rate`` each rule uses when none is configured."""


def apply_update(previous: SteeringSet | None, fitted: SteeringSet, rule: str, rate: float) -> SteeringSet:
    """The policy after one update: ``fitted`` combined with ``previous`` by ``rule`` at ``rate``."""
    if rule not in UPDATE_RULES:
        raise ValueError(f"unknown update rule {rule!r}; use one of {list(UPDATE_RULES)}")
    if previous is None or rule == "refit":
        policy = fitted
    elif rule == "accumulate":
        policy = previous + fitted.scaled(rate)
    else:
        policy = previous.scaled(1.0 - rate) + fitted.scaled(rate)
    policy.iteration = fitted.iteration
    policy.positions = fitted.positions  # this run's, also when the previous policy was a given init
    policy.model_name = fitted.model_name or policy.model_name
    return policy
