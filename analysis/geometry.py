"""Direction geometry: cosines across iterations and layers, drift curves, norms.

Pure functions over steering sets (one per iteration, ``{iteration: SteeringSet}``) and direction
tensors. A steering set's direction at a hook is :meth:`SteeringSet.direction` (multipliers folded
in). Cosines with a zero vector are NaN, not 0: an absent direction has no angle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.steering.functions import SteeringSet, layer_of

Policies = Mapping[int, SteeringSet]
"""Steering sets by iteration (1-based), e.g. the policy after each iteration of a run."""


def cosine_matrix(vectors: Float[Tensor, "n d"]) -> Float[Tensor, "n n"]:
    """Pairwise cosine similarities of the rows (float64); NaN in rows/columns of zero vectors."""
    v = vectors.double()
    norms = v.norm(dim=-1)
    unit = v / norms.clamp_min(1e-300).unsqueeze(-1)
    out = (unit @ unit.T).clamp(-1.0, 1.0)
    zero = norms <= 0
    out[zero, :] = math.nan
    out[:, zero] = math.nan
    return out


def cosine(a: Float[Tensor, " d"], b: Float[Tensor, " d"]) -> float:
    """Cosine similarity of two vectors; NaN if either is zero."""
    return float(cosine_matrix(torch.stack([a.double(), b.double()]))[0, 1])


def hooks_of(policies: Policies) -> list[str]:
    """Every hook any of the steering sets steers, in order of layer then name."""
    hooks = {hook for steering in policies.values() for hook in steering.functions}
    return sorted(hooks, key=lambda h: (layer_of(h) if layer_of(h) is not None else -1, h))


def _resolve_hook(policies: Policies, hook_or_layer: str | int) -> str:
    if isinstance(hook_or_layer, str):
        return hook_or_layer
    matches = [h for h in hooks_of(policies) if layer_of(h) == hook_or_layer]
    if len(matches) != 1:
        raise ValueError(f"layer {hook_or_layer} matches {len(matches)} steered hooks ({matches}); pass a hook name")
    return matches[0]


def iteration_directions(policies: Policies, hook: str) -> tuple[list[int], Float[Tensor, "n_iter d_model"]]:
    """The direction at ``hook`` of every iteration that steers it (iterations, stacked directions)."""
    iterations = [t for t in sorted(policies) if hook in policies[t].functions]
    if not iterations:
        raise ValueError(f"no steering set steers {hook!r}")
    return iterations, torch.stack([policies[t].direction(hook).float() for t in iterations])


def iteration_cosines(policies: Policies, hook_or_layer: str | int) -> pd.DataFrame:
    """Iteration x iteration cosine matrix of one hook's (or layer's) direction."""
    hook = _resolve_hook(policies, hook_or_layer)
    iterations, vectors = iteration_directions(policies, hook)
    frame = pd.DataFrame(cosine_matrix(vectors).numpy(), index=iterations, columns=iterations)
    frame.index.name, frame.columns.name = "iteration", "iteration"
    return frame


def layer_cosines(steering: SteeringSet) -> pd.DataFrame:
    """Layer x layer cosine matrix of one steering set's directions (labels are layers, or hooks)."""
    hooks = hooks_of({0: steering})
    if not hooks:
        return pd.DataFrame()
    labels = _labels(hooks)
    vectors = torch.stack([steering.direction(h).float() for h in hooks])
    frame = pd.DataFrame(cosine_matrix(vectors).numpy(), index=labels, columns=labels)
    frame.index.name, frame.columns.name = "layer", "layer"
    return frame


def drift(policies: Policies) -> pd.DataFrame:
    """Drift curves, tidy: per iteration and hook, the cosine to the previous, first and final direction.

    Columns ``iteration, hook, layer, metric, value`` with metric ``cos_prev`` (NaN at the first
    iteration a hook is steered), ``cos_first`` and ``cos_final``.
    """
    rows = []
    for hook in hooks_of(policies):
        iterations, vectors = iteration_directions(policies, hook)
        cos = cosine_matrix(vectors)
        for i, t in enumerate(iterations):
            previous = float(cos[i, i - 1]) if i else math.nan
            for metric, value in (("cos_prev", previous), ("cos_first", cos[i, 0]), ("cos_final", cos[i, -1])):
                rows.append(
                    {"iteration": t, "hook": hook, "layer": layer_of(hook), "metric": metric, "value": float(value)}
                )
    return pd.DataFrame(rows, columns=["iteration", "hook", "layer", "metric", "value"])


def direction_norms(policies: Policies) -> pd.DataFrame:
    """Direction norms, tidy: columns ``iteration, hook, layer, value`` (one row per steered hook)."""
    rows = [
        {"iteration": t, "hook": hook, "layer": layer_of(hook), "value": norm}
        for t in sorted(policies)
        for hook, norm in policies[t].norms().items()
    ]
    return pd.DataFrame(rows, columns=["iteration", "hook", "layer", "value"])


def _labels(hooks: list[str]) -> list[int] | list[str]:
    layers = [layer_of(h) for h in hooks]
    if None in layers or len(set(layers)) != len(layers):
        return hooks
    return [int(layer) for layer in layers if layer is not None]


def geometry_rows(
    iteration: int,
    policy: SteeringSet,
    previous: SteeringSet | None = None,
    first: SteeringSet | None = None,
    fit: SteeringSet | None = None,
    previous_fit: SteeringSet | None = None,
) -> list[dict[str, object]]:
    """Tidy metric rows (split ``analysis``) of one iteration's per-layer geometry.

    ``norm`` of the policy's direction, its ``cos_prev`` / ``cos_first`` to the previous and first
    iteration's policy, and the iteration's fit: ``fit_norm`` and ``fit_cos_prev`` (to the previous
    iteration's fit). Rows whose reference is missing are left out. ``layer`` is the hook's layer.
    """
    rows: list[dict[str, object]] = []

    def add(metric: str, hook: str, value: float) -> None:
        rows.append(
            {"iteration": iteration, "split": "analysis", "metric": metric, "layer": layer_of(hook), "value": value}
        )

    for hook in policy.functions:
        direction = policy.direction(hook)
        add("norm", hook, float(direction.norm()))
        for metric, other in (("cos_prev", previous), ("cos_first", first)):
            if other is not None and hook in other.functions:
                add(metric, hook, cosine(direction, other.direction(hook)))
        if fit is not None and hook in fit.functions:
            add("fit_norm", hook, float(fit.direction(hook).norm()))
            if previous_fit is not None and hook in previous_fit.functions:
                add("fit_cos_prev", hook, cosine(fit.direction(hook), previous_fit.direction(hook)))
    return rows
