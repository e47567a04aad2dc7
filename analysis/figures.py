"""Plotly figures of a run, and ``RUN/figures/index.html`` linking them (pages open offline).

Each ``*_figure`` function takes steering sets by iteration or a tidy metrics table (columns
``iteration, split, metric, layer, value``) and returns a ``plotly.graph_objects.Figure``;
:func:`write_index` writes them all under ``RUN/figures/`` with one shared local ``plotly.min.js``.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.geometry import Policies, direction_norms, drift, hooks_of, iteration_cosines, layer_cosines
from analysis.run_data import RunData, config_summary, load_run, summary_from_metrics
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
}
"""The figures :func:`build_figures` makes, by file stem, with a one-line description."""


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
            "Separability of H+ vs H- per layer (cross-validated, grouped by prompt; "
            "null: labels permuted within prompts; 0.5 = chance)"
        )
    else:
        title = (
            "Separability of H+ vs H- per layer (older run: probe accuracy from one split not grouped by "
            "prompt, Fisher ratio in sample; 0.5 = chance)"
        )
    fig.update_layout(title=title)
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


def build_figures(data: RunData) -> dict[str, go.Figure]:
    """Every figure of :data:`FIGURES` for one run."""
    metrics = data.all_metrics
    builders: dict[str, Callable[[], go.Figure]] = {
        "heldout": lambda: heldout_figure(metrics),
        "train": lambda: train_figure(metrics),
        "cosine_iterations": lambda: cosine_iterations_figure(data.policies),
        "cosine_layers": lambda: cosine_layers_figure(data.policies),
        "drift": lambda: drift_figure(data.policies),
        "norms": lambda: norms_figure(data.policies, data.fits),
        "separability": lambda: separability_figure(metrics),
    }
    return {name: build() for name, build in builders.items()}


def ensure_plotlyjs(folder: Path) -> Path:
    """A local ``plotly.min.js`` in ``folder`` (written once), so the pages open offline."""
    from plotly.offline import get_plotlyjs

    path = folder / "plotly.min.js"
    if not path.is_file():
        _write_atomic(path, get_plotlyjs())
    return path


def write_figure(fig: go.Figure, path: Path) -> Path:
    """One figure as an HTML page that loads the ``plotly.min.js`` next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_plotlyjs(path.parent)
    _write_atomic(path, fig.to_html(include_plotlyjs="directory", full_html=True))
    return path


def write_index(run_dir: str | Path, data: RunData | None = None) -> Path:
    """Write ``RUN/figures/*.html`` and ``RUN/figures/index.html``; returns the index path."""
    data = data if data is not None else load_run(run_dir)
    folder = RunFolder(run_dir).figures_dir
    folder.mkdir(parents=True, exist_ok=True)
    figures = build_figures(data)
    for name, fig in figures.items():
        write_figure(fig, folder / f"{name}.html")
    summary = summary_from_metrics(data.metrics)
    _write_atomic(folder / "index.html", index_html(data, list(figures), summary))
    return folder / "index.html"


def index_html(data: RunData, names: list[str], summary: pd.DataFrame) -> str:
    """The index page: configuration summary, iterations done, held-out table, links to the figures."""
    config = config_summary(data.config)
    total = data.config.get("iterations", "?")
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in config.items())
    links = "".join(
        f'<li><a href="{name}.html">{name}</a>: {html.escape(FIGURES.get(name, ""))}</li>' for name in names
    )
    table = summary.to_html(float_format=lambda x: f"{x:.3f}", na_rep="", border=0) if len(summary) else "<p>none</p>"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>SIMS run {html.escape(data.path.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{padding:2px 10px;text-align:left}}tr:nth-child(even){{background:#f4f4f4}}</style></head>
<body>
<h1>SIMS run: {html.escape(str(data.path))}</h1>
<p>iterations done: <b>{data.completed_iterations}</b> of {html.escape(str(total))}</p>
<table>{rows}</table>
<h2>Held-out metrics (iteration 0 = base model)</h2>
{table}
<h2>Figures</h2>
<ul>{links}</ul>
</body></html>
"""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
