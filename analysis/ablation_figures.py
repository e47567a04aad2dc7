"""Plotly figures of the ablations (:mod:`analysis.ablations`): the layer sweep, the variants, the multiplier."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.plots import color, empty_figure, grouped_line


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
        return empty_figure(title, "no layer evaluated")
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
                grouped_line(part["layer"], part[metric], f"x{m:g}", f"x{m:g}", r == 1, i),
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
