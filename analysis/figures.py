"""Plotly figures of a run and the registry :func:`build_figures` draws from (:data:`FIGURES`).

Each ``*_figure`` function takes steering sets by iteration or a tidy metrics table (columns
``iteration, split, metric, layer, value``) and returns a ``plotly.graph_objects.Figure``: held-out
and training metrics, the geometry of the steered layers' directions, their separability. The
figures of every observed layer are in :mod:`analysis.observed_figures`; :mod:`analysis.pages`
writes them all as HTML pages with ``RUN/figures/index.html``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.geometry import Policies, direction_norms, drift, hooks_of, iteration_cosines, layer_cosines
from analysis.observed import ObservedSummary, load_summaries
from analysis.observed_figures import (
    NO_OBSERVED,
    candidate_cosine_layers_figure,
    candidate_drift_figure,
    most_separable_layer,
    observed_scatter_figure,
    separability_layers_figure,
)
from analysis.plots import color, cosine_heatmap, empty_figure, grouped_line, hook_label, selector
from analysis.run_data import RunData
from sims_lens.metrics import HELDOUT_METRICS

DRIFT_METRICS = ["cos_prev", "cos_first", "cos_final"]
SEPARABILITY_METRICS = ["probe_accuracy", "probe_accuracy_null", "fisher_ratio"]
"""The per-layer separability rows the separability figure draws (older runs have no ``probe_accuracy_null``)."""
FIGURES: dict[str, str] = {
    "heldout": "Held-out reward, win rate vs the base model, perplexity under the base model, response length",
    "train": "Training batches: mean reward of the samples, best-minus-worst reward gap of the pairs",
    "cosine_iterations": "Cosine similarity of each layer's direction across iterations (one heatmap per layer)",
    "cosine_layers": "Cosine similarity between the layers' directions within one iteration",
    "drift": "Drift: cosine of each iteration's direction to the previous, first and final one",
    "norms": "Norm of each layer's steering direction (the policy, and what each iteration fitted)",
    "separability": "Separability of H+ vs H- per layer: probe accuracy (cross-validated, grouped by prompt) "
    "with its label-permuted null, and the held-out Fisher ratio",
    "separability_layers": "Separability of H+ vs H- at every observed layer and iteration (heatmap): "
    "cross-validated probe accuracy minus its permutation null",
    "candidate_drift": "Each observed layer's candidate direction (mean(H+) - mean(H-)): cosine to the previous "
    "iteration's and to iteration 1's candidate (layer x iteration heatmaps)",
    "candidate_cosine_layers": "Cosine between the observed layers' candidate directions within one iteration "
    "(slider: iteration)",
    "observed_scatter": "H+ and H- of the last observed iteration in 2-D, per layer: coordinate on the mean "
    "difference and on the top principal component of the rest (dropdown: layer)",
}
"""The figures :func:`build_figures` makes, by file stem, with a one-line description."""


def cosine_iterations_figure(policies: Policies) -> go.Figure:
    """Per layer, the iteration x iteration cosine heatmap of its direction (dropdown picks the layer)."""
    hooks = hooks_of(policies)
    if not hooks:
        return empty_figure("Direction cosine across iterations", "no finished iteration yet")
    fig = go.Figure()
    for i, hook in enumerate(hooks):
        fig.add_trace(cosine_heatmap(iteration_cosines(policies, hook), hook_label(hook), i == 0))
    selector(fig, [hook_label(h) for h in hooks], 0)
    fig.update_layout(title="Direction cosine across iterations", xaxis_title="iteration", yaxis_title="iteration")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def cosine_layers_figure(policies: Policies) -> go.Figure:
    """Per iteration, the layer x layer cosine heatmap (dropdown picks the iteration; the last is shown)."""
    iterations = [t for t in sorted(policies) if len(policies[t])]
    if not iterations:
        return empty_figure("Direction cosine across layers", "no finished iteration yet")
    fig = go.Figure()
    for t in iterations:
        fig.add_trace(cosine_heatmap(layer_cosines(policies[t]), f"iteration {t}", t == iterations[-1]))
    selector(fig, [f"iteration {t}" for t in iterations], len(iterations) - 1)
    fig.update_layout(title="Direction cosine across layers", xaxis_title="layer", yaxis_title="layer")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def drift_figure(policies: Policies) -> go.Figure:
    """Cosine of each iteration's direction to the previous, first and final one, one line per layer."""
    frame = drift(policies)
    if frame.empty:
        return empty_figure("Direction drift", "no finished iteration yet")
    fig = make_subplots(rows=1, cols=len(DRIFT_METRICS), subplot_titles=DRIFT_METRICS, shared_yaxes=True)
    for col, metric in enumerate(DRIFT_METRICS, start=1):
        part = frame[frame["metric"] == metric]
        for i, (hook, rows) in enumerate(part.groupby("hook", sort=False)):
            fig.add_trace(
                grouped_line(rows["iteration"], rows["value"], hook_label(str(hook)), str(hook), col == 1, i),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="iteration", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="cosine", range=[-1.05, 1.05], row=1, col=1)
    fig.update_layout(title="Direction drift across iterations")
    return fig


def norms_figure(policies: Policies, fits: Policies | None = None) -> go.Figure:
    """Direction norm per iteration and layer: the policy's, and (if given) what each iteration fitted."""
    parts = [("policy", direction_norms(policies))]
    if fits:
        parts.append(("fit", direction_norms(fits)))
    if parts[0][1].empty:
        return empty_figure("Direction norms", "no finished iteration yet")
    fig = make_subplots(rows=1, cols=len(parts), subplot_titles=[f"{name} norm" for name, _ in parts])
    hooks = hooks_of(policies)
    for col, (_, frame) in enumerate(parts, start=1):
        for hook, rows in frame.groupby("hook", sort=False):
            fig.add_trace(
                grouped_line(
                    rows["iteration"],
                    rows["value"],
                    hook_label(str(hook)),
                    str(hook),
                    col == 1,
                    hooks.index(str(hook)) if hook in hooks else 0,
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="iteration", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="L2 norm", rangemode="tozero", row=1, col=1)
    fig.update_layout(title="Steering direction norms")
    return fig


def _global(metrics: pd.DataFrame, split: str, metric: str) -> pd.DataFrame:
    rows = metrics[(metrics["split"] == split) & (metrics["metric"] == metric) & metrics["layer"].isna()]
    return rows.sort_values("iteration").drop_duplicates("iteration", keep="last")


def heldout_figure(metrics: pd.DataFrame) -> go.Figure:
    """Held-out metrics over iterations: the policy's line, and the base model's (iteration 0) as a dashed line."""
    fig = make_subplots(rows=2, cols=2, subplot_titles=HELDOUT_METRICS)
    found = False
    for i, metric in enumerate(HELDOUT_METRICS):
        row, col = i // 2 + 1, i % 2 + 1
        rows = _global(metrics, "heldout", metric)
        if rows.empty:
            continue
        found = True
        fig.add_trace(
            go.Scatter(
                x=rows["iteration"],
                y=rows["value"],
                mode="lines+markers",
                name="policy",
                legendgroup="policy",
                showlegend=not i,
                line={"color": color(0)},
            ),
            row=row,
            col=col,
        )
        base = rows[rows["iteration"] == 0]
        reference = float(base["value"].iloc[0]) if len(base) else (0.5 if metric == "win_rate_vs_base" else None)
        if reference is not None:
            last = max(int(metrics["iteration"].max()), 1)
            fig.add_trace(
                go.Scatter(
                    x=[0, last],
                    y=[reference, reference],
                    mode="lines",
                    name="base (iteration 0)" if metric != "win_rate_vs_base" else "chance (0.5)",
                    legendgroup="chance" if metric == "win_rate_vs_base" else "base",
                    showlegend=metric in ("reward_mean", "win_rate_vs_base"),
                    line={"dash": "dash", "color": "#888888"},
                ),
                row=row,
                col=col,
            )
        fig.update_xaxes(title_text="iteration", dtick=1, row=row, col=col)
    if not found:
        return empty_figure("Held-out metrics", "no held-out metrics yet")
    fig.update_layout(title="Held-out metrics over iterations (iteration 0 = base model)", height=650)
    return fig


def train_figure(metrics: pd.DataFrame) -> go.Figure:
    """Training-batch statistics over iterations: mean sample reward and mean pair margin."""
    names = ["reward_mean", "pair_margin_mean"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"train {n}" for n in names])
    found = False
    for col, metric in enumerate(names, start=1):
        rows = _global(metrics, "train", metric)
        if rows.empty:
            continue
        found = True
        fig.add_trace(
            go.Scatter(
                x=rows["iteration"], y=rows["value"], mode="lines+markers", name=metric, line={"color": color(col - 1)}
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="iteration", dtick=1, row=1, col=col)
    if not found:
        return empty_figure("Training batches", "no finished iteration yet")
    fig.update_layout(title="Training batches (the policy's own samples)")
    return fig


def separability_figure(metrics: pd.DataFrame) -> go.Figure:
    """Probe accuracy (with its null, dashed) and Fisher ratio of H+ vs H- per layer, one colour per iteration.

    Uses the ``analysis`` split where the live callback wrote it, else the loop's ``train`` rows.
    ``probe_accuracy_null`` (the same cross-validation on label-permuted pairs: the chance level
    this data gives) is drawn as a dashed line in its iteration's colour. Runs written before it
    existed have no null rows; their accuracy came from one ungrouped split and their Fisher ratio
    was in-sample, and the title says so.
    """
    rows = metrics[metrics["metric"].isin(SEPARABILITY_METRICS) & metrics["layer"].notna()]
    if (rows["split"] == "analysis").any():
        rows = rows[rows["split"] == "analysis"]
    if rows.empty:
        return empty_figure("Separability of H+ vs H-", "no separability metrics yet")
    has_null = bool((rows["metric"] == "probe_accuracy_null").any())
    panels = ["probe_accuracy", "fisher_ratio"]
    titles = ["probe accuracy (dashed: null)", "Fisher ratio (held out)"] if has_null else panels
    iterations = sorted(rows["iteration"].unique())
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for col, metric in enumerate(panels, start=1):
        part = rows[rows["metric"] == metric].sort_values(["iteration", "layer"])
        for iteration, group in part.groupby("iteration"):
            fig.add_trace(
                grouped_line(
                    group["layer"].astype(int),
                    group["value"],
                    f"iteration {iteration}",
                    f"iteration {iteration}",
                    col == 1,
                    iterations.index(iteration),
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="layer", row=1, col=col)
    null = rows[rows["metric"] == "probe_accuracy_null"].sort_values(["iteration", "layer"])
    for iteration, group in null.groupby("iteration"):
        fig.add_trace(
            go.Scatter(
                x=group["layer"].astype(int),
                y=group["value"],
                mode="lines",
                name=f"iteration {iteration} null",
                legendgroup=f"iteration {iteration}",
                showlegend=False,
                line={"color": color(iterations.index(iteration)), "dash": "dash"},
            ),
            row=1,
            col=1,
        )
    if has_null:  # one legend entry explains the dashed lines
        fig.add_trace(
            go.Scatter(x=[None], y=[None], mode="lines", name="null", line={"color": "#888888", "dash": "dash"}),
            row=1,
            col=1,
        )
    fig.add_hline(y=0.5, line_dash="dot", line_color="#888888", row=1, col=1)
    if has_null:
        title = (
            "Separability of H+ vs H- per layer<br><sup>cross-validated, grouped by prompt; "
            "null: labels permuted within prompts; 0.5 = chance</sup>"
        )
    else:
        title = (
            "Separability of H+ vs H- per layer<br><sup>older run: probe accuracy from one split not grouped by "
            "prompt, Fisher ratio in sample; 0.5 = chance</sup>"
        )
    fig.update_layout(title=title)
    return fig


def reward_summary_figure(metrics: pd.DataFrame, height: int = 300) -> go.Figure:
    """Held-out reward per iteration, small (0 = base model, dashed); a relative oracle's win rate instead."""
    metric, reference_name = "reward_mean", "base"
    rows = _global(metrics, "heldout", metric)
    if rows.empty:
        metric, reference_name = "win_rate_vs_base", "chance"
        rows = _global(metrics, "heldout", metric)
    if rows.empty:
        return empty_figure("Held-out reward", "no held-out metrics yet")
    fig = go.Figure(
        go.Scatter(x=rows["iteration"], y=rows["value"], mode="lines+markers", name="policy", line={"color": color(0)})
    )
    base = rows[rows["iteration"] == 0]
    reference = float(base["value"].iloc[0]) if len(base) else (0.5 if metric == "win_rate_vs_base" else None)
    if reference is not None:
        fig.add_hline(y=reference, line_dash="dash", line_color="#888888")
    label = "reward" if metric == "reward_mean" else "win rate vs base"
    fig.update_layout(
        title={"text": f"Held-out {label} (dashed: {reference_name})", "font": {"size": 14}},
        height=height,
        margin={"l": 50, "r": 20, "t": 50, "b": 40},
        showlegend=False,
    )
    fig.update_xaxes(title_text="iteration", dtick=1 if rows["iteration"].max() <= 15 else None)
    fig.update_yaxes(title_text=metric)
    return fig


def build_figures(
    data: RunData, observed: dict[int, ObservedSummary] | None = None, names: Sequence[str] | None = None
) -> dict[str, go.Figure]:
    """Every figure of :data:`FIGURES` (or those in ``names``) for one run.

    ``observed``: the observed-layer summaries by iteration (:func:`analysis.observed.load_summaries`);
    None reads them from the run folder (none for runs made before every layer was observed: those
    figures then say so).
    """
    unknown = sorted(set(names or ()) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; known: {sorted(FIGURES)}")
    metrics = data.all_metrics
    summaries: dict[int, ObservedSummary] = (
        observed if observed is not None else (load_summaries(data.path) if data.path.is_dir() else {})
    )
    builders: dict[str, Callable[[], go.Figure]] = {
        "heldout": lambda: heldout_figure(metrics),
        "train": lambda: train_figure(metrics),
        "cosine_iterations": lambda: cosine_iterations_figure(data.policies),
        "cosine_layers": lambda: cosine_layers_figure(data.policies),
        "drift": lambda: drift_figure(data.policies),
        "norms": lambda: norms_figure(data.policies, data.fits),
        "separability": lambda: separability_figure(metrics),
        "separability_layers": lambda: separability_layers_figure(metrics),
        "candidate_drift": lambda: candidate_drift_figure(metrics),
        "candidate_cosine_layers": lambda: candidate_cosine_layers_figure(summaries),
        "observed_scatter": lambda: _last_scatter(summaries, metrics),
    }
    return {name: build() for name, build in builders.items() if names is None or name in names}


def _last_scatter(summaries: dict[int, ObservedSummary], metrics: pd.DataFrame) -> go.Figure:
    """:func:`observed_scatter_figure` of the last observed iteration, at its most separable layer."""
    if not summaries:
        return empty_figure("H+ and H- in 2-D per layer", NO_OBSERVED)
    last = max(summaries)
    return observed_scatter_figure(summaries[last], default_layer=most_separable_layer(metrics, last))
