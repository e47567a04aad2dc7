"""Plotly figures of every observed layer: layer x iteration heatmaps, layer x layer cosines, H+ / H- in 2-D.

They read the ``analysis`` rows the live callback (or :func:`analysis.report.report`) wrote for every
observed layer, or the observed-layer summaries of :mod:`analysis.observed` (by iteration). Figures
over layers and iterations are heatmaps on category axes, sized for 30+ layers and 10+ iterations;
cells carry their value as text only while a heatmap has at most :data:`analysis.plots.MAX_TEXT_ROWS` rows.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.observed import ObservedSummary, candidate_cosines
from analysis.plots import COSINE_SCALE, cell_text, color, cosine_heatmap, empty_figure, grid_height, hook_label
from sims_lens.steering.functions import layer_of

SEPARABILITY_SPAN = 0.5
"""Colour range of accuracy minus null: [-0.5, 0.5] (fixed, so runs compare by colour)."""

THRESHOLD_METRIC = "probe_accuracy_threshold"
"""The per-iteration row (no layer) of the 95% family-wise permutation threshold of probe accuracy."""
THRESHOLD_LABEL = "95% family-wise permutation threshold (max over layers)"

NO_OBSERVED = (
    "no observed activations: this run observed only its steered layers (made before every layer was observed)"
)


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


def _thresholds(metrics: pd.DataFrame, split: str, iterations: list[int]) -> np.ndarray:
    """Per iteration, the ``split``'s :data:`THRESHOLD_METRIC` row (NaN where it has none: older runs)."""
    rows = metrics[(metrics["metric"] == THRESHOLD_METRIC) & (metrics["split"] == split)]
    by_iteration = rows.drop_duplicates("iteration", keep="last").set_index("iteration")["value"]
    return by_iteration.reindex(iterations).to_numpy(dtype=float)


def _axes(rows: pd.DataFrame) -> tuple[list[int], list[int]]:
    return sorted({int(v) for v in rows["layer"]}), sorted({int(v) for v in rows["iteration"]})


def separability_layers_figure(metrics: pd.DataFrame, height: int | None = None) -> go.Figure:
    """Layer x iteration heatmap of cross-validated separability: probe accuracy minus its permutation null.

    The colour is how far the probe beats the chance level this very data gives (its sign-flip null),
    so 0 means "not linearly readable" whatever the number of pairs and dimensions; accuracy and null
    are in the hover. Older runs without null rows use 0.5 as the reference (the title says so). Every
    observed layer where the live analysis wrote ``analysis`` rows, else the steered layers' ``train`` rows.

    A star marks each cell whose accuracy exceeds its iteration's ``probe_accuracy_threshold`` of the
    same split (the 95% family-wise permutation threshold, the null's maximum over these layers):
    the best of ~30 layers beats its own null by chance, so only a starred layer is separable beyond
    that. The threshold is in the hover; a split without threshold rows (older runs) has no stars.
    """
    title = "Separability of H+ vs H- per layer and iteration"
    rows = _layer_metric_rows(metrics, ["probe_accuracy", "probe_accuracy_null"])
    if not (rows["metric"] == "probe_accuracy").any():
        return empty_figure(title, "no separability metrics yet")
    layers, iterations = _axes(rows[rows["metric"] == "probe_accuracy"])
    accuracy = layer_grid(rows, "probe_accuracy", layers, iterations)
    null = layer_grid(rows, "probe_accuracy_null", layers, iterations)
    has_null = not np.isnan(null).all()
    reference = null if has_null else np.full_like(accuracy, 0.5)
    threshold = _thresholds(metrics, str(rows["split"].iloc[0]), iterations)
    has_threshold = not np.isnan(threshold).all()
    cell_threshold = np.broadcast_to(threshold, accuracy.shape)
    fig = go.Figure(
        go.Heatmap(
            z=accuracy - reference,
            x=[str(t) for t in iterations],
            y=[str(layer) for layer in layers],
            customdata=np.dstack([accuracy, reference, cell_threshold] if has_threshold else [accuracy, reference]),
            zmin=-SEPARABILITY_SPAN,
            zmax=SEPARABILITY_SPAN,
            zmid=0.0,
            colorscale=COSINE_SCALE,
            colorbar={"title": {"text": "acc − null" if has_null else "acc − 0.5"}},
            texttemplate=cell_text(len(layers)),
            hovertemplate="layer %{y}, iteration %{x}<br>probe accuracy %{customdata[0]:.3f}<br>"
            + ("null" if has_null else "chance")
            + " %{customdata[1]:.3f}<br>difference %{z:+.3f}"
            + (f"<br>{THRESHOLD_LABEL}: %{{customdata[2]:.3f}}" if has_threshold else "")
            + "<extra></extra>",
            name="separability",
        )
    )
    above = np.argwhere(accuracy > cell_threshold)  # NaN compares False: no star without a threshold
    if len(above):
        fig.add_trace(
            go.Scatter(
                x=[str(iterations[j]) for _, j in above],
                y=[str(layers[i]) for i, _ in above],
                mode="markers",
                marker={"symbol": "star", "size": 11, "color": "black", "line": {"color": "white", "width": 1}},
                customdata=np.stack([accuracy[i, j] for i, j in above]),
                hovertext=[f"{cell_threshold[i, j]:.3f}" for i, j in above],
                hovertemplate="layer %{y}, iteration %{x}<br>probe accuracy %{customdata:.3f} above the "
                + THRESHOLD_LABEL
                + " %{hovertext}<extra></extra>",
                name=f"above the {THRESHOLD_LABEL}",
                showlegend=True,
            )
        )
        fig.update_layout(legend={"orientation": "h", "x": 0.0, "y": -0.12, "yanchor": "top"})
    if has_null:
        title += (
            "<br><sub>cross-validated probe accuracy minus its permutation null (0 = chance; folds grouped by prompt)"
            + (f"; ★ above the {THRESHOLD_LABEL}" if has_threshold else "")
            + "</sub>"
        )
    else:
        title += "<br><sub>probe accuracy minus 0.5 (older run: no permutation null)</sub>"
    fig.update_layout(title={"text": title, "font": {"size": 14}}, height=height or grid_height(len(layers)))
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
        return empty_figure(title, NO_OBSERVED)
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
                texttemplate=cell_text(len(layers)),
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
        height=grid_height(len(layers)),
    )
    return fig


def candidate_cosine_layers_figure(observed: dict[int, ObservedSummary]) -> go.Figure:
    """Per iteration, the layer x layer cosine of the observed layers' candidates (slider: iteration, last shown)."""
    title = "Cosine between the layers' candidate directions (mean(H+) − mean(H-)) within one iteration"
    iterations = [t for t in sorted(observed) if len(observed[t].hooks)]
    if not iterations:
        return empty_figure(title, NO_OBSERVED)
    fig = go.Figure()
    n = 0
    for t in iterations:
        frame = candidate_cosines(observed[t])
        n = max(n, len(frame))
        fig.add_trace(cosine_heatmap(frame, f"iteration {t}", t == iterations[-1]))
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
    fig.update_layout(title={"text": title, "font": {"size": 14}}, height=grid_height(n, low=480, high=1000) + 60)
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
        return empty_figure(title, NO_OBSERVED)
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
                    customdata=np.stack([rows["prompt_id"].astype(str), rows["pair"].astype(str)], axis=-1),
                    hovertemplate="prompt %{customdata[0]}, pair %{customdata[1]}<br>x %{x:.3f}, y %{y:.3f}"
                    f"<extra>{side} {html.escape(hook_label(hook))}</extra>",
                )
            )
    labels = [hook_label(h) for h in hooks]
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
