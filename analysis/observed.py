"""Every observed layer at one iteration: the candidate direction, its drift, separability, a 2-D view.

The loop observes the base model's activations of D+ and D- at every layer it is asked to
observe (by default all of them at the configured hook), not only the steered ones:
:class:`~sims_lens.activations.PairActivations` ``observed_positives`` / ``observed_negatives``
``[n_pairs, n_observed, d_model]`` (per pair, the mean response-token activation of y+ / y-),
``observed_hooks`` and ``prompt_ids``: ``IterationResult.activations`` in the loop, and what a run
folder keeps (``RunFolder.load_observed``). From them, per
observed layer l:

- the **candidate** direction ``c_l = mean(H+_l) - mean(H-_l)`` (what ``mean_diff`` would fit there),
  its norm, its cosine to the previous iteration's candidate at l, to iteration 1's, and to the
  steered direction where l is steered (the policy's direction at that hook);
- separability of H+ vs H- (:func:`sims_lens.separability.separability`: probe accuracy
  cross-validated over folds of prompts, its sign-flip null, the held-out Fisher ratio);
- the layer x layer cosine matrix of the candidates;
- a 2-D view: each activation's coordinate on the unit mean difference, and on the top principal
  component of what remains once that coordinate is removed (the cloud centred on its mean).

:func:`summarize` keeps what the figures need of one iteration (the candidates and the 2-D
coordinates, small) so the activations themselves need not stay in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from analysis.geometry import cosine, cosine_matrix
from sims_lens.activations import PairActivations
from sims_lens.iteration import IterationResult
from sims_lens.metrics import MetricRow, metric_row
from sims_lens.run_folder import RunFolder
from sims_lens.separability import Separability, probe_accuracy_threshold, separability_by_hook
from sims_lens.steering.functions import SteeringSet, layer_of

OBSERVED_METRICS = [
    "candidate_norm",
    "candidate_cos_prev",
    "candidate_cos_first",
    "candidate_cos_steered",
    "probe_accuracy",
    "probe_accuracy_null",
    "fisher_ratio",
]
"""The per-layer ``analysis`` rows :func:`observed_rows` writes for every observed layer."""

SEPARABILITY_METRICS = ["probe_accuracy", "probe_accuracy_null", "fisher_ratio"]
PROJECTION_COLUMNS = ["iteration", "hook", "layer", "side", "pair", "prompt_id", "x", "y"]


@dataclass
class ObservedSummary:
    """What the figures keep of one iteration: candidates ``[n_observed, d_model]`` and 2-D coordinates."""

    iteration: int
    hooks: list[str]
    candidates: Tensor
    projection: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PROJECTION_COLUMNS))
    n_pairs: int = 0

    def by_hook(self) -> dict[str, Tensor]:
        """The candidate of each observed hook."""
        return {hook: self.candidates[i] for i, hook in enumerate(self.hooks)}


# -- reading -----------------------------------------------------------------------------------


def observed_of(result: IterationResult) -> PairActivations | None:
    """The observed activations of a loop iteration (None for a loop that observes nothing)."""
    return result.activations if result.activations.observed_hooks else None


def observed_iterations(run_dir: str | Path) -> list[int]:
    """The finished iterations of a run folder that kept their observed activations ([] for older runs)."""
    return RunFolder(run_dir).observed_iterations()


def load_observed(run_dir: str | Path, iteration: int) -> PairActivations | None:
    """One iteration's observed activations from a run folder (None if it kept none)."""
    return RunFolder(run_dir).load_observed(iteration)


def load_summaries(
    run_dir: str | Path, known: Mapping[int, ObservedSummary] | None = None
) -> dict[int, ObservedSummary]:
    """:func:`summarize` of every observed iteration of a run folder, by iteration.

    Iterations already in ``known`` are taken from there and not read again.
    """
    out = dict(known or {})
    for t in observed_iterations(run_dir):
        if t not in out:
            observed = load_observed(run_dir, t)
            if observed is not None:
                out[t] = summarize(observed)
    return dict(sorted(out.items()))


# -- per layer ---------------------------------------------------------------------------------


def candidates(observed: PairActivations) -> Float[Tensor, "n_observed d_model"]:
    """``mean(H+_l) - mean(H-_l)`` of every observed layer (float64 means, float32 result)."""
    return (observed.observed_positives.double().mean(0) - observed.observed_negatives.double().mean(0)).float()


def plane(pos: Float[Tensor, "n d"], neg: Float[Tensor, "n d"]) -> tuple[Float[Tensor, " n2"], Float[Tensor, " n2"]]:
    """2-D coordinates of the rows of ``pos`` then ``neg``: ``(x, y)``, each of length ``2 n``.

    The cloud is centred on its mean; ``x`` is the coordinate on the unit mean difference
    ``u = unit(mean(pos) - mean(neg))`` (so ``mean x+ - mean x- = ||mean(pos) - mean(neg)||``), ``y``
    the coordinate on the top principal component of the rest (``h - (h . u) u``), its sign
    chosen so that its largest entry is positive. Zero where there is no such direction.
    """
    x = torch.cat([pos, neg]).double()
    centred = x - x.mean(0)
    diff = pos.double().mean(0) - neg.double().mean(0)
    norm = float(diff.norm())
    u = diff / norm if norm > 1e-12 else torch.zeros_like(diff)
    along = centred @ u
    rest = centred - along[:, None] * u[None, :]
    if rest.shape[0] >= 2 and float(rest.abs().max()) > 0:
        _, _, vh = torch.linalg.svd(rest, full_matrices=False)
        w = vh[0]
        w = w if float(w[w.abs().argmax()]) >= 0 else -w
        across = rest @ w
    else:
        across = torch.zeros_like(along)
    return along.float(), across.float()


def projection(observed: PairActivations) -> pd.DataFrame:
    """:func:`plane` of every observed layer, tidy (:data:`PROJECTION_COLUMNS`).

    Columns ``iteration, hook, layer, side (H+ / H-), pair, prompt_id, x, y``."""
    n = observed.n_pairs
    frames = []
    sides = ["H+"] * n + ["H-"] * n
    pairs = list(range(n)) * 2
    prompt_ids = [str(g) for g in observed.prompt_ids] * 2
    for i, hook in enumerate(observed.observed_hooks):
        x, y = plane(observed.observed_positives[:, i], observed.observed_negatives[:, i])
        frames.append(
            pd.DataFrame(
                {
                    "iteration": observed.iteration,
                    "hook": hook,
                    "layer": layer_of(hook),
                    "side": sides,
                    "pair": pairs,
                    "prompt_id": prompt_ids,
                    "x": x.numpy(),
                    "y": y.numpy(),
                }
            )
        )
    if not frames:
        return pd.DataFrame(columns=PROJECTION_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def summarize(observed: PairActivations) -> ObservedSummary:
    """The candidates and the 2-D coordinates of one iteration (what the figures need)."""
    return ObservedSummary(
        observed.iteration, list(observed.observed_hooks), candidates(observed), projection(observed), observed.n_pairs
    )


def candidate_cosines(summary: ObservedSummary) -> pd.DataFrame:
    """Layer x layer cosine matrix of one iteration's candidates (labels: layers, or hooks)."""
    labels = _labels(summary.hooks)
    frame = pd.DataFrame(cosine_matrix(summary.candidates).numpy(), index=labels, columns=labels)
    frame.index.name, frame.columns.name = "layer", "layer"
    return frame


def layer_separability(observed: PairActivations, seed: int = 0) -> dict[str, Separability]:
    """:func:`sims_lens.separability.separability_by_hook` of every observed layer."""
    return separability_by_hook(
        observed.observed_positives,
        observed.observed_negatives,
        observed.observed_hooks,
        observed.prompt_ids,
        seed=seed,
    )


def observed_rows(
    observed: PairActivations,
    *,
    summary: ObservedSummary | None = None,
    previous: Mapping[str, Tensor] | None = None,
    first: Mapping[str, Tensor] | None = None,
    policy: SteeringSet | None = None,
    seed: int = 0,
) -> list[MetricRow]:
    """The ``analysis`` rows (:data:`OBSERVED_METRICS`) of every observed layer of one iteration.

    ``previous`` / ``first``: the candidates (by hook) of the previous iteration and of iteration 1
    (pass this iteration's own at iteration 1); ``policy``: the policy after this iteration, whose
    direction at a steered hook gives ``candidate_cos_steered``. Rows whose reference is missing
    are left out. ``seed`` is the run's seed (the loop's own separability rows use it too). One
    row without a layer, ``probe_accuracy_threshold``, is the 95% family-wise permutation threshold
    over the observed layers (the null's maximum over them; see :mod:`sims_lens.separability`).
    """
    summary = summary if summary is not None else summarize(observed)
    own = summary.by_hook()
    measured = layer_separability(observed, seed)
    t = observed.iteration
    rows: list[MetricRow] = []
    for hook in observed.observed_hooks:
        layer = layer_of(hook)
        c = own[hook]
        rows.append(metric_row(t, "analysis", "candidate_norm", float(c.norm()), layer))
        for metric, other in (("candidate_cos_prev", previous), ("candidate_cos_first", first)):
            if other is not None and hook in other:
                rows.append(metric_row(t, "analysis", metric, cosine(c, other[hook]), layer))
        if policy is not None and hook in policy.functions:
            rows.append(metric_row(t, "analysis", "candidate_cos_steered", cosine(c, policy.direction(hook)), layer))
        sep = measured[hook]
        rows += [
            metric_row(t, "analysis", "probe_accuracy", sep.probe_accuracy, layer),
            metric_row(t, "analysis", "probe_accuracy_null", sep.probe_accuracy_null, layer),
            metric_row(t, "analysis", "fisher_ratio", sep.fisher_ratio, layer),
        ]
    if observed.observed_hooks:  # the family-wise null over these layers: what the best of them must beat
        threshold = probe_accuracy_threshold(
            observed.observed_positives, observed.observed_negatives, observed.prompt_ids, seed=seed
        )
        rows.append(metric_row(t, "analysis", "probe_accuracy_threshold", threshold))
    return rows


def separability_frame(observed: PairActivations, seed: int = 0) -> pd.DataFrame:
    """Per observed layer: ``hook, layer, probe_accuracy, probe_accuracy_null, fisher_ratio``."""
    rows = [
        {
            "hook": hook,
            "layer": layer_of(hook),
            "probe_accuracy": sep.probe_accuracy,
            "probe_accuracy_null": sep.probe_accuracy_null,
            "fisher_ratio": sep.fisher_ratio,
        }
        for hook, sep in layer_separability(observed, seed).items()
    ]
    return pd.DataFrame(rows, columns=["hook", "layer", *SEPARABILITY_METRICS])


def run_observed_rows(
    run_dir: str | Path, seed: int | None = None, summaries: Mapping[int, ObservedSummary] | None = None
) -> list[MetricRow]:
    """:func:`observed_rows` of every observed iteration of a run folder (what the live callback writes).

    The previous / first candidates come from the iterations before (iteration 1 included only if
    it was observed); the policy from ``steering/iter_NNN``. ``seed``: default the run's.
    """
    folder = RunFolder(run_dir)
    if seed is None:
        seed = int(folder.read_config_table().get("seed", 0))
    known: dict[int, ObservedSummary] = dict(summaries or {})
    rows: list[MetricRow] = []
    for t in observed_iterations(run_dir):
        observed = load_observed(run_dir, t)
        if observed is None:
            continue
        summary = known.get(t) or summarize(observed)
        known[t] = summary
        previous = known.get(t - 1)
        first = known.get(1)
        rows += observed_rows(
            observed,
            summary=summary,
            previous=previous.by_hook() if previous is not None else None,
            first=first.by_hook() if first is not None else None,
            policy=folder.load_steering(t, "policy"),
            seed=seed,
        )
    return rows


def _labels(hooks: Sequence[str]) -> list[int] | list[str]:
    layers = [layer_of(h) for h in hooks]
    if None in layers or len(set(layers)) != len(layers):
        return list(hooks)
    return [int(layer) for layer in layers if layer is not None]
