"""Plotly figures of a run, and ``RUN/figures/index.html`` linking them (pages open offline).

Each ``*_figure`` function takes steering sets by iteration, a tidy metrics table (columns
``iteration, split, metric, layer, value``) or the observed-layer summaries of
:mod:`analysis.observed` (by iteration) and returns a ``plotly.graph_objects.Figure``;
:func:`write_index` writes them all under ``RUN/figures/`` with one shared local ``plotly.min.js``,
the logit-lens table (``logit_lens.html``) and ``index.html``, which opens with a one-screen summary
(held-out reward, the layer x iteration separability heatmap, the logit-lens table).

Figures over layers and iterations are heatmaps on category axes, sized for 30+ layers and 10+
iterations; cells carry their value as text only while a heatmap has at most
:data:`MAX_TEXT_ROWS` rows.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.geometry import Policies, direction_norms, drift, hooks_of, iteration_cosines, layer_cosines
from analysis.logit_lens import read_lens
from analysis.observed import ObservedSummary, candidate_cosines, load_summaries
from analysis.run_data import RunData, config_summary, load_run, summary_from_metrics
from sims_lens.files import write_atomic
from sims_lens.metrics import HELDOUT_METRICS
from sims_lens.run_folder import RunFolder
from sims_lens.steering.functions import layer_of

DRIFT_METRICS = ["cos_prev", "cos_first", "cos_final"]
SEPARABILITY_METRICS = ["probe_accuracy", "probe_accuracy_null", "fisher_ratio"]
"""The per-layer separability rows the separability figure draws (older runs have no ``probe_accuracy_null``)."""
COSINE_SCALE = "RdBu"
COLORWAY = [
    "#636efa",
    "#EF553B",
    "#00cc96",
    "#ab63fa",
    "#FFA15A",
    "#19d3f3",
    "#FF6692",
    "#B6E880",
    "#FF97FF",
    "#FECB52",
]

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

PAGES: dict[str, str] = {
    "logit_lens": "Logit lens of every observed layer's candidate direction, per iteration: the tokens it "
    "promotes and suppresses through the final norm and the unembedding",
}
"""Plain HTML pages :func:`write_index` writes next to the figures (tables, not plotly)."""

MAX_TEXT_ROWS = 12
"""Heatmaps with more rows (layers) than this carry no per-cell text (hover shows the values)."""
INDEX_LENS_ITERATIONS = 4
"""The logit-lens table on ``index.html`` shows this many latest iterations (``logit_lens.html`` all)."""
SEPARABILITY_SPAN = 0.5
"""Colour range of accuracy minus null: [-0.5, 0.5] (fixed, so runs compare by colour)."""


def color(index: int) -> str:
    """The ``index``-th colour of plotly's default colourway (so one layer keeps its colour across subplots)."""
    return COLORWAY[index % len(COLORWAY)]


def _hook_label(hook: str) -> str:
    layer = layer_of(hook)
    return f"layer {layer}" if layer is not None else hook


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title)
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    return fig


def _selector(fig: go.Figure, labels: list[str], active: int) -> None:
    """A dropdown that shows one trace (heatmap) at a time."""
    if len(labels) < 2:
        return
    buttons = [
        {"label": label, "method": "update", "args": [{"visible": [j == i for j in range(len(labels))]}]}
        for i, label in enumerate(labels)
    ]
    fig.update_layout(updatemenus=[{"buttons": buttons, "active": active, "x": 1.0, "y": 1.15, "xanchor": "right"}])


def _heatmap(frame: pd.DataFrame, name: str, visible: bool) -> go.Heatmap:
    labels_x = [str(c) for c in frame.columns]
    labels_y = [str(i) for i in frame.index]
    return go.Heatmap(
        z=frame.to_numpy(),
        x=labels_x,
        y=labels_y,
        zmin=-1.0,
        zmax=1.0,
        colorscale=COSINE_SCALE,
        texttemplate="%{z:.2f}" if len(frame) <= 12 else None,
        name=name,
        visible=visible,
        hovertemplate="%{y} vs %{x}: %{z:.3f}<extra>" + html.escape(name) + "</extra>",
    )


def cosine_iterations_figure(policies: Policies) -> go.Figure:
    """Per layer, the iteration x iteration cosine heatmap of its direction (dropdown picks the layer)."""
    hooks = hooks_of(policies)
    if not hooks:
        return _empty("Direction cosine across iterations", "no finished iteration yet")
    fig = go.Figure()
    for i, hook in enumerate(hooks):
        fig.add_trace(_heatmap(iteration_cosines(policies, hook), _hook_label(hook), i == 0))
    _selector(fig, [_hook_label(h) for h in hooks], 0)
    fig.update_layout(title="Direction cosine across iterations", xaxis_title="iteration", yaxis_title="iteration")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def cosine_layers_figure(policies: Policies) -> go.Figure:
    """Per iteration, the layer x layer cosine heatmap (dropdown picks the iteration; the last is shown)."""
    iterations = [t for t in sorted(policies) if len(policies[t])]
    if not iterations:
        return _empty("Direction cosine across layers", "no finished iteration yet")
    fig = go.Figure()
    for t in iterations:
        fig.add_trace(_heatmap(layer_cosines(policies[t]), f"iteration {t}", t == iterations[-1]))
    _selector(fig, [f"iteration {t}" for t in iterations], len(iterations) - 1)
    fig.update_layout(title="Direction cosine across layers", xaxis_title="layer", yaxis_title="layer")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def drift_figure(policies: Policies) -> go.Figure:
    """Cosine of each iteration's direction to the previous, first and final one, one line per layer."""
    frame = drift(policies)
    if frame.empty:
        return _empty("Direction drift", "no finished iteration yet")
    fig = make_subplots(rows=1, cols=len(DRIFT_METRICS), subplot_titles=DRIFT_METRICS, shared_yaxes=True)
    for col, metric in enumerate(DRIFT_METRICS, start=1):
        part = frame[frame["metric"] == metric]
        for i, (hook, rows) in enumerate(part.groupby("hook", sort=False)):
            fig.add_trace(
                _grouped_line(rows["iteration"], rows["value"], _hook_label(str(hook)), str(hook), col == 1, i),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="iteration", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="cosine", range=[-1.05, 1.05], row=1, col=1)
    fig.update_layout(title="Direction drift across iterations")
    return fig


def _grouped_line(x: Any, y: Any, name: str, group: str, show_legend: bool, color_index: int) -> go.Scatter:
    """A line with markers in legend group ``group``; subplots after the first hide its legend entry."""
    return go.Scatter(
        x=x,
        y=y,
        mode="lines+markers",
        name=name,
        legendgroup=group,
        showlegend=show_legend,
        line={"color": color(color_index)},
    )


def norms_figure(policies: Policies, fits: Policies | None = None) -> go.Figure:
    """Direction norm per iteration and layer: the policy's, and (if given) what each iteration fitted."""
    parts = [("policy", direction_norms(policies))]
    if fits:
        parts.append(("fit", direction_norms(fits)))
    if parts[0][1].empty:
        return _empty("Direction norms", "no finished iteration yet")
    fig = make_subplots(rows=1, cols=len(parts), subplot_titles=[f"{name} norm" for name, _ in parts])
    hooks = hooks_of(policies)
    for col, (_, frame) in enumerate(parts, start=1):
        for hook, rows in frame.groupby("hook", sort=False):
            fig.add_trace(
                _grouped_line(
                    rows["iteration"],
                    rows["value"],
                    _hook_label(str(hook)),
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
        return _empty("Held-out metrics", "no held-out metrics yet")
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
        return _empty("Training batches", "no finished iteration yet")
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
        return _empty("Separability of H+ vs H-", "no separability metrics yet")
    has_null = bool((rows["metric"] == "probe_accuracy_null").any())
    panels = ["probe_accuracy", "fisher_ratio"]
    titles = ["probe accuracy (dashed: null)", "Fisher ratio (held out)"] if has_null else panels
    iterations = sorted(rows["iteration"].unique())
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for col, metric in enumerate(panels, start=1):
        part = rows[rows["metric"] == metric].sort_values(["iteration", "layer"])
        for iteration, group in part.groupby("iteration"):
            fig.add_trace(
                _grouped_line(
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


NO_OBSERVED = (
    "no observed activations: this run observed only its steered layers (made before every layer was observed)"
)


def _grid_height(n_rows: int, low: int = 420, high: int = 1100) -> int:
    """A heatmap height that gives each of ``n_rows`` rows about 20 px, within [low, high]."""
    return int(min(high, max(low, 170 + 20 * n_rows)))


def _layer_metric_rows(metrics: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Per-layer rows of ``names``: the ``analysis`` split where it has them, else the loop's ``train`` rows."""
    rows = metrics[metrics["metric"].isin(names) & metrics["layer"].notna()]
    if (rows["split"] == "analysis").any():
        return rows[rows["split"] == "analysis"]
    return rows[rows["split"] == "train"]


def layer_grid(rows: pd.DataFrame, metric: str, layers: list[int], iterations: list[int]) -> np.ndarray:
    """``metric``'s values as a ``[layer, iteration]`` array over the given layers and iterations (NaN: none)."""
    part = rows[rows["metric"] == metric].sort_values("iteration")
    if part.empty:
        return np.full((len(layers), len(iterations)), np.nan)
    part = part.assign(layer=part["layer"].astype(int)).drop_duplicates(["layer", "iteration"], keep="last")
    grid = part.pivot(index="layer", columns="iteration", values="value")
    return grid.reindex(index=layers, columns=iterations).to_numpy(dtype=float)


def _axes(rows: pd.DataFrame) -> tuple[list[int], list[int]]:
    return sorted({int(v) for v in rows["layer"]}), sorted({int(v) for v in rows["iteration"]})


def _cell_text(n_rows: int) -> str | None:
    return "%{z:.2f}" if n_rows <= MAX_TEXT_ROWS else None


def separability_layers_figure(metrics: pd.DataFrame, height: int | None = None) -> go.Figure:
    """Layer x iteration heatmap of cross-validated separability: probe accuracy minus its permutation null.

    The colour is how far the probe beats the chance level this very data gives (its sign-flip null),
    so 0 means "not linearly readable" whatever the number of pairs and dimensions; accuracy and null
    are in the hover. Older runs without null rows use 0.5 as the reference (the title says so). Every
    observed layer where the live analysis wrote ``analysis`` rows, else the steered layers' ``train`` rows.
    """
    title = "Separability of H+ vs H- per layer and iteration"
    rows = _layer_metric_rows(metrics, ["probe_accuracy", "probe_accuracy_null"])
    if not (rows["metric"] == "probe_accuracy").any():
        return _empty(title, "no separability metrics yet")
    layers, iterations = _axes(rows[rows["metric"] == "probe_accuracy"])
    accuracy = layer_grid(rows, "probe_accuracy", layers, iterations)
    null = layer_grid(rows, "probe_accuracy_null", layers, iterations)
    has_null = not np.isnan(null).all()
    reference = null if has_null else np.full_like(accuracy, 0.5)
    fig = go.Figure(
        go.Heatmap(
            z=accuracy - reference,
            x=[str(t) for t in iterations],
            y=[str(layer) for layer in layers],
            customdata=np.dstack([accuracy, reference]),
            zmin=-SEPARABILITY_SPAN,
            zmax=SEPARABILITY_SPAN,
            zmid=0.0,
            colorscale=COSINE_SCALE,
            colorbar={"title": {"text": "acc − null" if has_null else "acc − 0.5"}},
            texttemplate=_cell_text(len(layers)),
            hovertemplate="layer %{y}, iteration %{x}<br>probe accuracy %{customdata[0]:.3f}<br>"
            + ("null" if has_null else "chance")
            + " %{customdata[1]:.3f}<br>difference %{z:+.3f}<extra></extra>",
            name="separability",
        )
    )
    if has_null:
        title += (
            "<br><sub>cross-validated probe accuracy minus its permutation null (0 = chance; folds grouped by prompt)"
            "</sub>"
        )
    else:
        title += "<br><sub>probe accuracy minus 0.5 (older run: no permutation null)</sub>"
    fig.update_layout(title={"text": title, "font": {"size": 14}}, height=height or _grid_height(len(layers)))
    fig.update_xaxes(type="category", title_text="iteration")
    fig.update_yaxes(type="category", title_text="layer")
    return fig


def candidate_drift_figure(metrics: pd.DataFrame) -> go.Figure:
    """Layer x iteration heatmaps of each observed layer's candidate direction: cosine to the previous
    iteration's candidate (left) and to iteration 1's (right)."""
    names = ["candidate_cos_prev", "candidate_cos_first"]
    rows = metrics[metrics["metric"].isin(names) & metrics["layer"].notna()]
    title = "Candidate direction (mean(H+) − mean(H-)) of every observed layer across iterations"
    if rows.empty:
        return _empty(title, NO_OBSERVED)
    layers, iterations = _axes(rows)
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.04,
        subplot_titles=["cosine to the previous iteration's candidate", "cosine to iteration 1's candidate"],
    )
    for col, metric in enumerate(names, start=1):
        fig.add_trace(
            go.Heatmap(
                z=layer_grid(rows, metric, layers, iterations),
                x=[str(t) for t in iterations],
                y=[str(layer) for layer in layers],
                coloraxis="coloraxis",
                texttemplate=_cell_text(len(layers)),
                name=metric,
                hovertemplate="layer %{y}, iteration %{x}: %{z:.3f}<extra>" + metric + "</extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(type="category", title_text="iteration", row=1, col=col)
    fig.update_yaxes(type="category", title_text="layer", row=1, col=1)
    fig.update_yaxes(type="category", row=1, col=2)
    fig.update_layout(
        title={"text": title, "font": {"size": 14}},
        coloraxis={"colorscale": COSINE_SCALE, "cmin": -1.0, "cmax": 1.0, "colorbar": {"title": {"text": "cosine"}}},
        height=_grid_height(len(layers)),
    )
    return fig


def candidate_cosine_layers_figure(observed: dict[int, ObservedSummary]) -> go.Figure:
    """Per iteration, the layer x layer cosine of the observed layers' candidates (slider: iteration, last shown)."""
    title = "Cosine between the layers' candidate directions (mean(H+) − mean(H-)) within one iteration"
    iterations = [t for t in sorted(observed) if len(observed[t].hooks)]
    if not iterations:
        return _empty(title, NO_OBSERVED)
    fig = go.Figure()
    n = 0
    for t in iterations:
        frame = candidate_cosines(observed[t])
        n = max(n, len(frame))
        fig.add_trace(_heatmap(frame, f"iteration {t}", t == iterations[-1]))
    if len(iterations) > 1:
        steps = [
            {
                "label": str(t),
                "method": "update",
                "args": [{"visible": [j == i for j in range(len(iterations))]}],
            }
            for i, t in enumerate(iterations)
        ]
        fig.update_layout(
            sliders=[
                {
                    "active": len(iterations) - 1,
                    "currentvalue": {"prefix": "iteration "},
                    "steps": steps,
                    "pad": {"t": 40},
                }
            ]
        )
    fig.update_layout(title={"text": title, "font": {"size": 14}}, height=_grid_height(n, low=480, high=1000) + 60)
    fig.update_xaxes(type="category", title_text="layer")
    fig.update_yaxes(type="category", title_text="layer", autorange="reversed")
    return fig


def most_separable_layer(metrics: pd.DataFrame, iteration: int | None) -> int | None:
    """The layer whose probe accuracy beats its null by most at ``iteration`` (None if unknown)."""
    if iteration is None:
        return None
    rows = _layer_metric_rows(metrics, ["probe_accuracy", "probe_accuracy_null"])
    rows = rows[rows["iteration"] == iteration]
    table = rows.pivot_table(index="layer", columns="metric", values="value", aggfunc="last")
    if "probe_accuracy" not in table:
        return None
    excess = table["probe_accuracy"] - table.get("probe_accuracy_null", 0.5)
    excess = excess.dropna()
    return int(excess.idxmax()) if len(excess) else None


def observed_scatter_figure(summary: ObservedSummary, default_layer: int | None = None) -> go.Figure:
    """H+ and H- of one iteration in 2-D at each observed layer (dropdown: layer).

    x: coordinate on the unit mean difference (H+ right of H- by the candidate's norm); y: the top
    principal component of what remains once x is removed (the cloud centred on its mean). Shown first:
    ``default_layer`` (e.g. :func:`most_separable_layer`), else the middle observed layer.
    """
    title = f"H+ and H- at one layer, iteration {summary.iteration}"
    hooks = list(summary.hooks)
    if not hooks or summary.projection.empty:
        return _empty(title, NO_OBSERVED)
    layers = [layer_of(h) for h in hooks]
    active = layers.index(default_layer) if default_layer in layers else len(hooks) // 2
    frame = summary.projection
    fig = go.Figure()
    for i, hook in enumerate(hooks):
        part = frame[frame["hook"] == hook]
        for side, colour in (("H+", color(2)), ("H-", color(1))):
            rows = part[part["side"] == side]
            fig.add_trace(
                go.Scatter(
                    x=rows["x"],
                    y=rows["y"],
                    mode="markers",
                    name=f"{side} ({'preferred' if side == 'H+' else 'dispreferred'})",
                    legendgroup=side,
                    visible=i == active,
                    marker={"color": colour, "size": 7, "opacity": 0.8},
                    customdata=np.stack([rows["group"].astype(str), rows["pair"].astype(str)], axis=-1),
                    hovertemplate="prompt %{customdata[0]}, pair %{customdata[1]}<br>x %{x:.3f}, y %{y:.3f}"
                    f"<extra>{side} {html.escape(_hook_label(hook))}</extra>",
                )
            )
    labels = [_hook_label(h) for h in hooks]
    if len(hooks) > 1:
        buttons = [
            {
                "label": label,
                "method": "update",
                "args": [{"visible": [j // 2 == i for j in range(2 * len(hooks))]}],
            }
            for i, label in enumerate(labels)
        ]
        fig.update_layout(updatemenus=[{"buttons": buttons, "active": active, "x": 1.0, "y": 1.12, "xanchor": "right"}])
    fig.update_layout(
        title={
            "text": title + "<br><sub>x: on the mean difference; y: top principal component of the rest</sub>",
            "font": {"size": 14},
        },
        height=560,
    )
    fig.update_xaxes(title_text="coordinate on unit(mean(H+) − mean(H-))", zeroline=True)
    fig.update_yaxes(title_text="top principal component of the rest", zeroline=True)
    return fig


def reward_summary_figure(metrics: pd.DataFrame, height: int = 300) -> go.Figure:
    """Held-out reward per iteration, small (0 = base model, dashed); a relative oracle's win rate instead."""
    metric, reference_name = "reward_mean", "base"
    rows = _global(metrics, "heldout", metric)
    if rows.empty:
        metric, reference_name = "win_rate_vs_base", "chance"
        rows = _global(metrics, "heldout", metric)
    if rows.empty:
        return _empty("Held-out reward", "no held-out metrics yet")
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


def layer_sweep_figure(table: pd.DataFrame) -> go.Figure:
    """The layer sweep (:func:`analysis.ablations.layer_sweep`): held-out reward and perplexity when each layer
    alone is steered with its candidate, above that layer's separability (probe accuracy minus its null).

    Where the preference is causally steerable (top panels), next to where it is linearly readable
    (bottom). One line per multiplier; the base model's values dashed.
    """
    rows = table[table["variant"] != "base"].sort_values(["multiplier", "layer"])
    base = table[table["variant"] == "base"]
    title = "Layer sweep: steering each layer alone with its candidate direction"
    if rows.empty:
        return _empty(title, "no layer evaluated")
    reward = "reward_mean" if rows["reward_mean"].notna().any() else "win_rate_vs_base"
    panels = [reward, "perplexity_under_base"]
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=[
            f"held-out {reward} (dashed: base model)",
            "perplexity under the base model (fluency cost)",
            "separability: probe accuracy − its null (cross-validated by prompt)",
        ],
    )
    multipliers = sorted(rows["multiplier"].unique())
    for r, metric in enumerate(panels, start=1):
        for i, m in enumerate(multipliers):
            part = rows[rows["multiplier"] == m]
            fig.add_trace(
                _grouped_line(part["layer"], part[metric], f"x{m:g}", f"x{m:g}", r == 1, i),
                row=r,
                col=1,
            )
        if len(base) and pd.notna(base[metric].iloc[0]):
            fig.add_hline(y=float(base[metric].iloc[0]), line_dash="dash", line_color="#888888", row=r, col=1)
        elif metric == "win_rate_vs_base":
            fig.add_hline(y=0.5, line_dash="dash", line_color="#888888", row=r, col=1)
    layers = rows.drop_duplicates("layer").sort_values("layer")
    if {"probe_accuracy", "probe_accuracy_null"} <= set(layers.columns):
        excess = layers["probe_accuracy"] - layers["probe_accuracy_null"]
        fig.add_trace(
            go.Bar(x=layers["layer"], y=excess, name="accuracy − null", marker_color=color(3), showlegend=False),
            row=3,
            col=1,
        )
    fig.add_hline(y=0.0, line_dash="dot", line_color="#888888", row=3, col=1)
    fig.update_xaxes(title_text="layer", row=3, col=1)
    fig.update_layout(
        title={
            "text": title + "<br><sub>where it is steerable, next to where it is readable</sub>",
            "font": {"size": 14},
        },
        height=820,
        legend_title_text="multiplier",
    )
    return fig


def ablation_figure(table: pd.DataFrame) -> go.Figure:
    """Bars of held-out reward and perplexity per ablation variant; the base model's as a dashed line."""
    metrics = ["reward_mean", "perplexity_under_base"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=metrics)
    base = table[table["family"] == "base"]
    for col, metric in enumerate(metrics, start=1):
        fig.add_trace(
            go.Bar(x=table["variant"], y=table[metric], name=metric, marker_color=color(col - 1)), row=1, col=col
        )
        if len(base):
            fig.add_hline(y=float(base[metric].iloc[0]), line_dash="dash", line_color="#888888", row=1, col=col)
    fig.update_layout(title="Ablations on held-out prompts (dashed: base model)", showlegend=False)
    return fig


def multiplier_figure(table: pd.DataFrame) -> go.Figure:
    """Held-out reward and perplexity against the policy's multiplier (0 = base model, 1 = as learned)."""
    rows = table[table["family"].isin(["base", "all", "multiplier"])].sort_values("multiplier")
    metrics = ["reward_mean", "perplexity_under_base"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=metrics)
    for col, metric in enumerate(metrics, start=1):
        fig.add_trace(
            go.Scatter(
                x=rows["multiplier"], y=rows[metric], mode="lines+markers", name=metric, line={"color": color(col - 1)}
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="multiplier", row=1, col=col)
    fig.update_layout(title="Steering strength: reward against fluency cost", showlegend=False)
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
        return _empty("H+ and H- in 2-D per layer", NO_OBSERVED)
    last = max(summaries)
    return observed_scatter_figure(summaries[last], default_layer=most_separable_layer(metrics, last))


def ensure_plotlyjs(folder: Path) -> Path:
    """A local ``plotly.min.js`` in ``folder`` (written once), so the pages open offline."""
    from plotly.offline import get_plotlyjs

    path = folder / "plotly.min.js"
    if not path.is_file():
        write_atomic(path, get_plotlyjs())
    return path


def write_figure(fig: go.Figure, path: Path) -> Path:
    """One figure as an HTML page that loads the ``plotly.min.js`` next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_plotlyjs(path.parent)
    write_atomic(path, fig.to_html(include_plotlyjs="directory", full_html=True))
    return path


def write_index(
    run_dir: str | Path,
    data: RunData | None = None,
    observed: dict[int, ObservedSummary] | None = None,
    lens: pd.DataFrame | None = None,
) -> Path:
    """Write ``RUN/figures/*.html``, ``logit_lens.html`` and ``index.html``; returns the index path.

    ``observed`` (summaries by iteration) and ``lens`` (the logit-lens table) default to what the
    run folder holds.
    """
    data = data if data is not None else load_run(run_dir)
    folder = RunFolder(run_dir).figures_dir
    folder.mkdir(parents=True, exist_ok=True)
    figures = build_figures(data, observed)
    for name, fig in figures.items():
        write_figure(fig, folder / f"{name}.html")
    ensure_plotlyjs(folder)  # index.html embeds two figures
    lens = lens if lens is not None else read_lens(run_dir)
    write_atomic(folder / "logit_lens.html", lens_page_html(data, lens))
    summary = summary_from_metrics(data.metrics)
    write_atomic(folder / "index.html", index_html(data, list(figures), summary, lens=lens))
    return folder / "index.html"


STYLE = """body{font-family:sans-serif;max-width:84em;margin:1.5em auto;padding:0 1em}
table{border-collapse:collapse}th,td{padding:2px 10px;text-align:left;vertical-align:top}
tr:nth-child(even){background:#f4f4f4}h2{margin-top:1.4em}
.summary{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.summary>div{flex:1 1 24em;min-width:20em}
.summary>div.wide{flex:2 1 36em}.scroll{max-height:45vh;overflow:auto;border:1px solid #ddd}
table.lens{font-size:85%}table.lens td{white-space:nowrap}table.lens thead th{position:sticky;top:0;background:#fff}
.up code{color:#1a7f37}.down code{color:#b42318}code{background:#f6f8fa;padding:0 2px;margin-right:3px}"""


def index_html(data: RunData, names: list[str], summary: pd.DataFrame, lens: pd.DataFrame | None = None) -> str:
    """The index page: a one-screen summary (held-out reward, separability heatmap, logit lens), then the
    links to the figures, the configuration and the held-out table."""
    metrics = data.all_metrics
    config = config_summary(data.config)
    total = data.config.get("iterations", "?")
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in config.items())
    links = "".join(
        f'<li><a href="{name}.html">{name}</a>: {html.escape(FIGURES.get(name, ""))}</li>' for name in names
    )
    links += "".join(f'<li><a href="{name}.html">{name}</a>: {html.escape(text)}</li>' for name, text in PAGES.items())
    table = summary.to_html(float_format=lambda x: f"{x:.3f}", na_rep="", border=0) if len(summary) else "<p>none</p>"
    reward = _embed(reward_summary_figure(metrics), "summary-reward")
    layers = _layer_count(metrics)
    separability = _embed(
        separability_layers_figure(metrics, height=int(min(520, max(300, 140 + 12 * layers)))), "summary-separability"
    )
    lens = lens if lens is not None else pd.DataFrame()
    latest = sorted(set(lens["iteration"]))[-INDEX_LENS_ITERATIONS:] if len(lens) else []
    lens_html = lens_table_html(lens, iterations=latest, k=3)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>SIMS run {html.escape(data.path.name)}</title>
<script src="plotly.min.js"></script>
<style>{STYLE}</style></head>
<body>
<h1>SIMS run: {html.escape(str(data.path))}</h1>
<p>iterations done: <b>{data.completed_iterations}</b> of {html.escape(str(total))}</p>
<div class="summary"><div>{reward}</div><div class="wide">{separability}</div></div>
<h2>Logit lens of each layer's candidate direction</h2>
<p>Candidate = mean(H+) - mean(H-) of the base model's activations at that layer; read through the final norm and
the unembedding: top promoted (green) and suppressed (red) tokens, the latest {INDEX_LENS_ITERATIONS} iterations
(all: <a href="logit_lens.html">logit_lens</a>). <code>␣</code> is a space.</p>
<div class="scroll">{lens_html}</div>
<h2>Figures</h2>
<ul>{links}</ul>
<h2>Run</h2>
<table>{rows}</table>
<h2>Held-out metrics (iteration 0 = base model)</h2>
{table}
</body></html>
"""


def lens_page_html(data: RunData, lens: pd.DataFrame) -> str:
    """``logit_lens.html``: the logit-lens table of every iteration (layer x iteration)."""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Logit lens: {html.escape(data.path.name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>Logit lens of each observed layer's candidate direction</h1>
<p>{html.escape(PAGES["logit_lens"])}. Each cell: promoted tokens (green, strongest first) over suppressed tokens
(red). <code>␣</code> is a space. <a href="index.html">back to the run</a></p>
{lens_table_html(lens, k=None)}
</body></html>
"""


def lens_table_html(
    lens: pd.DataFrame, iterations: list[int] | None = None, k: int | None = 3, direction: str = "candidate"
) -> str:
    """Layer x iteration HTML table; each cell the ``k`` (None: all) top promoted over suppressed tokens."""
    if lens is None or not len(lens):
        return (
            "<p>No logit-lens readings yet: they need the model (pass it to <code>live_callbacks</code>, or "
            "<code>analysis.report.report(run_dir, model, tokenizer)</code>) and a run that observes every layer.</p>"
        )
    rows = lens[(lens["direction"] == direction) & lens["layer"].notna()]
    if iterations is not None:
        rows = rows[rows["iteration"].isin(iterations)]
    if k is not None:
        rows = rows[rows["rank"] <= k]
    if rows.empty:
        return f"<p>No logit-lens readings of the {html.escape(direction)} direction.</p>"
    columns = sorted({int(t) for t in rows["iteration"]})
    layers = sorted({int(layer) for layer in rows["layer"]})
    cells: dict[tuple[int, int, str], list[str]] = {}
    for row in rows.sort_values("rank").itertuples(index=False):
        cells.setdefault((int(row.layer), int(row.iteration), str(row.sign)), []).append(_show_token(str(row.token)))
    head = "".join(f"<th>iteration {t}</th>" for t in columns)
    body = []
    for layer in layers:
        tds = []
        for t in columns:
            up = "".join(cells.get((layer, t, "promoted"), []))
            down = "".join(cells.get((layer, t, "suppressed"), []))
            tds.append(f'<td><span class="up">{up}</span><br><span class="down">{down}</span></td>')
        body.append(f"<tr><th>layer {layer}</th>{''.join(tds)}</tr>")
    return f'<table class="lens"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _show_token(token: str) -> str:
    visible = token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣")
    return f"<code>{html.escape(visible) if visible else '&empty;'}</code>"


def _embed(fig: go.Figure, div_id: str) -> str:
    """A figure as a ``<div>`` for a page that loads ``plotly.min.js`` itself."""
    return str(fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False}))


def _layer_count(metrics: pd.DataFrame) -> int:
    rows = metrics[metrics["metric"].isin(["probe_accuracy"]) & metrics["layer"].notna()]
    return int(rows["layer"].nunique())
