"""The page of a ``sims-lens sweep`` folder: how each factor moves held-out reward and perplexity.

Reads the two files :mod:`sims_lens.sweep` keeps in ``SWEEP_DIR`` and writes ``SWEEP_DIR/index.html``:

- :func:`load_results`: ``results.csv``, the cells' metric rows, each with its cell and factor values
- :func:`load_status`: ``status.json``, every cell's status (also the cells with no rows yet)
- :func:`reward_metric`: ``reward_mean``, or ``win_rate_vs_base`` where the oracle is relative
- :func:`factor_figure`: one held-out metric against iteration, a line per value of one factor
- :func:`write_sweep_report`: the status table, then each factor's reward and perplexity figures

Cells that differ only in the seed factor (:data:`sims_lens.sweep.grid.SEED`) are repeats. Each gives
one value per iteration (its run's held-out mean over prompts), so a line is the mean over seeds and
its band the Student-t 95% interval over seeds, ``mean +- t(0.975, n - 1) * sd / sqrt(n)``. Not the
percentile bootstrap of :mod:`sims_lens.stats`: a sweep has a handful of seeds, and with two of them
the bootstrap interval is their range, which holds the true mean only half the time.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from scipy import stats

from analysis.pages import REFIT_SCRIPT, STYLE, ensure_plotlyjs
from analysis.plots import band_trace, color, empty_figure, grouped_line
from sims_lens.files import write_atomic
from sims_lens.metrics import METRIC_COLUMNS
from sims_lens.sweep.folder import SweepFolder
from sims_lens.sweep.grid import SEED

HELDOUT = "heldout"
REWARD, WIN_RATE, PERPLEXITY = "reward_mean", "win_rate_vs_base", "perplexity_under_base"
LEVEL = 0.95
"""The coverage of the band over seeds."""
MAX_FACETS = 6
"""More combinations of the other factors than this are pooled into one panel (the title says so)."""
RESULT_COLUMNS = ["cell", *METRIC_COLUMNS]
"""The columns every ``results.csv`` has; the factor columns sit between ``cell`` and ``iteration``."""
_REBUILD = "run the sweep again: it rebuilds results.csv from the cells' run folders"


def load_status(sweep_dir: str | Path) -> dict[str, Any]:
    """``SWEEP_DIR/status.json`` as written: ``{"factors": [...], "cells": [{"name", "status", ...}]}``.

    FileNotFoundError if it is missing (not a sweep folder, or no sweep has started in it);
    ValueError naming the file if it is not JSON or lacks the factor list or a cell's name or status.
    """
    path = SweepFolder(sweep_dir).status_path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a sweep folder (sims-lens sweep GRID.toml --out DIR)")
    fix = "delete it and run the sweep again (finished cells are kept)"
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not JSON ({err}); {fix}") from None
    cells = data.get("cells") if isinstance(data, dict) else None
    if not isinstance(cells, list) or not isinstance(data.get("factors"), list):
        raise ValueError(f"{path} needs a 'factors' list and a 'cells' list; {fix}")
    for i, cell in enumerate(cells):
        if not (isinstance(cell, dict) and isinstance(cell.get("name"), str) and isinstance(cell.get("status"), str)):
            raise ValueError(f"{path}: cell {i} lacks a name or a status; {fix}")
    return dict(data)


def load_results(sweep_dir: str | Path) -> pd.DataFrame:
    """``SWEEP_DIR/results.csv``: ``iteration`` int, ``value`` and ``layer`` float (empty = NaN), the rest text.

    Factor values stay text as written (``[3, 15]``, ``0``), so they group exactly as the cells do. An
    empty file is an empty table. FileNotFoundError if the file is missing (no cell has finished an
    iteration yet); ValueError naming the file if it is unreadable, lacks a column or holds a bad number.
    """
    path = SweepFolder(sweep_dir).results_path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: no cell has finished an iteration yet, or not a sweep folder")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable CSV file ({err}); {_REBUILD}") from None
    missing = [c for c in RESULT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}; {_REBUILD}")
    for column in ("iteration", "value", "layer"):
        text = frame[column].str.strip()
        numbers = pd.to_numeric(text.replace("", np.nan), errors="coerce")
        bad = numbers.isna() & ((text != "") | (column == "iteration"))
        if bad.any():
            line = int(np.flatnonzero(bad)[0]) + 2
            raise ValueError(f"{path} line {line}: {column} = {text[bad].iloc[0]!r} is not a number; {_REBUILD}")
        frame[column] = numbers.astype(int) if column == "iteration" else numbers.astype(float)
    return frame


def heldout(results: pd.DataFrame) -> pd.DataFrame:
    """The held-out rows that are not per layer (one value per cell, iteration and metric)."""
    return results[(results["split"] == HELDOUT) & results["layer"].isna()]


def reward_metric(results: pd.DataFrame) -> str:
    """``win_rate_vs_base`` if there are held-out rows but none of ``reward_mean`` (a relative oracle logs no
    reward mean), else ``reward_mean`` (also while there are no rows yet)."""
    metrics = heldout(results)["metric"]
    return WIN_RATE if len(metrics) and not (metrics == REWARD).any() else REWARD


def _summary(rows: pd.DataFrame, by: list[str], unit: str | None) -> pd.DataFrame:
    """Per ``by`` + iteration: the mean over units (seeds) of each unit's mean, its interval and unit count.

    ``unit`` None: every row is its own unit and there is no interval (no seed factor to repeat over).
    """
    keys = [*by, "iteration"]
    per_unit = rows.groupby([*keys, unit or "cell"], sort=False)["value"].mean().reset_index()
    out = per_unit.groupby(keys, sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
    n = out["count"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf((1 + LEVEL) / 2, n - 1) * out["std"].to_numpy() / np.sqrt(n)
    half = np.where((n >= 2) & (unit is not None), half, np.nan)
    return out.assign(low=out["mean"] - half, high=out["mean"] + half, n=out["count"])


def factor_figure(results: pd.DataFrame, factors: list[str], factor: str, metric: str) -> go.Figure:
    """Held-out ``metric`` against iteration, one line per value of ``factor`` (mean over seeds, band = interval).

    ``factors``: the sweep's factors in grid order. The other non-seed factors make one facet column
    per combination of their values; with more than :data:`MAX_FACETS` combinations they are pooled
    (each seed's value averaged over them first) and the title says so. ``factor`` may be the seed
    factor itself: then a line per seed, no band. Values and facets keep the order of ``results``.
    """
    if factor not in factors:
        raise ValueError(f"{factor!r} is not a factor of this sweep (factors: {', '.join(factors) or 'none'})")
    rows = heldout(results)
    rows = rows[rows["metric"] == metric]
    unit = SEED if SEED in factors and factor != SEED else None
    others = [f for f in factors if f not in (factor, SEED)]
    title = f"Held-out {metric} by {factor}"
    if rows.empty:
        return empty_figure(title, f"no held-out {metric} rows yet (no cell has finished an iteration with it)")
    combos = [", ".join(f"{k}={v}" for k, v in zip(others, vs, strict=True)) for vs in rows[others].itertuples(False)]
    facets = list(dict.fromkeys(combos))
    if len(facets) > MAX_FACETS:
        title += f", pooled over {len(facets)} combinations of {', '.join(others)}"
        combos, facets = [""] * len(rows), [""]
    note = f"mean over seeds; band: {LEVEL:.0%} t-interval over seeds (2 or more)" if unit else "no interval"
    rows = rows.assign(facet=combos)
    summary = _summary(rows, ["facet", factor], unit)
    values = list(dict.fromkeys(rows[factor]))
    titles = facets if facets != [""] else None
    fig = make_subplots(rows=1, cols=len(facets), subplot_titles=titles, shared_yaxes=True, horizontal_spacing=0.04)
    shown: set[str] = set()
    for col, facet in enumerate(facets, start=1):
        for i, value in enumerate(values):
            line = summary[(summary["facet"] == facet) & (summary[factor] == value)].sort_values("iteration")
            if line.empty:
                continue
            name = f"{factor}={value}"
            band = line[line["low"].notna()]
            if len(band):
                x, high, low = band["iteration"].tolist(), band["high"].tolist(), band["low"].tolist()
                fig.add_trace(band_trace(x, low, high, name, fillcolor=color(i), opacity=0.2), row=1, col=col)
            trace = grouped_line(line["iteration"], line["mean"], name, name, name not in shown, i)
            trace.update(
                customdata=line[["n", "low", "high"]].to_numpy(),
                hovertemplate=f"{html.escape(name)}, iteration %{{x}}: %{{y:.4g}} "
                "[%{customdata[1]:.4g}, %{customdata[2]:.4g}], n = %{customdata[0]}<extra></extra>",
            )
            fig.add_trace(trace, row=1, col=col)
            shown.add(name)
    if metric == WIN_RATE:
        fig.add_hline(y=0.5, line_dash="dot", line_color="#888888")
    fig.update_xaxes(title_text="iteration (0 = base model)", dtick=1)
    fig.update_yaxes(title_text=metric, col=1)
    fig.update_layout(title=f"{title}<br><sup>{note}</sup>", height=450, legend={"groupclick": "togglegroup"})
    return fig


def status_table(status: dict[str, Any]) -> pd.DataFrame:
    """One row per cell of ``status.json``: cell, status, iterations done/of, wall time (s), error."""
    rows = [
        {
            "cell": cell["name"],
            "status": cell["status"],
            "iterations": f"{cell.get('iterations', 0)}/{cell.get('of', '?')}",
            "wall time (s)": "" if cell.get("wall_s") is None else f"{float(cell['wall_s']):.1f}",
            "error": cell.get("error") or "",
        }
        for cell in status["cells"]
    ]
    return pd.DataFrame(rows, columns=["cell", "status", "iterations", "wall time (s)", "error"])


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """Write ``SWEEP_DIR/index.html`` (and ``plotly.min.js`` beside it, so it opens offline); returns its path.

    The status table, then for each non-seed factor (the seed factor when it is the only one) its
    reward (:func:`reward_metric`) and perplexity figures. Without ``results.csv`` the figures say
    no iteration has finished. The page names the folder, not its full path, and holds no time, so
    two identical sweeps in folders of one name give identical pages.
    """
    folder = SweepFolder(sweep_dir)
    status = load_status(folder.path)
    factors = [str(f) for f in status["factors"]]
    results = load_results(folder.path) if folder.results_path.is_file() else pd.DataFrame(columns=RESULT_COLUMNS)
    absent = [f for f in factors if f not in results.columns]
    if len(results) and absent:
        raise ValueError(f"{folder.results_path} lacks the factor column(s) {', '.join(absent)}; {_REBUILD}")
    metrics = (reward_metric(results), PERPLEXITY)
    figures = {f: [factor_figure(results, factors, f, m) for m in metrics] for f in [f for f in factors if f != SEED]}
    if not figures and factors:  # a sweep over seeds alone: a line per seed
        figures = {SEED: [factor_figure(results, factors, SEED, m) for m in metrics]}
    ensure_plotlyjs(folder.path)
    write_atomic(folder.index_path, _page(folder.path.resolve().name, status, factors, figures))
    return folder.index_path


def _page(name: str, status: dict[str, Any], factors: list[str], figures: dict[str, list[go.Figure]]) -> str:
    """The index page; figure divs get fixed ids (``figure-I-J``), so the same inputs give the same bytes."""
    table = status_table(status)
    counts = table["status"].value_counts()
    tally = ", ".join(f"{counts[s]} {s}" for s in ("done", "running", "pending", "failed") if s in counts)
    parts = []
    for i, (factor, figs) in enumerate(figures.items()):
        parts.append(f"<h2>By {html.escape(factor)}</h2>")
        for j, fig in enumerate(figs):
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{i}-{j}"))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>SIMS sweep {html.escape(name)}</title>
<script src="plotly.min.js"></script>
<style>{STYLE}</style></head>
<body>
<h1>SIMS sweep: {html.escape(name)}</h1>
<p>{len(table)} cells: {html.escape(tally or "none")}. Factors: {html.escape(", ".join(factors) or "none")}.</p>
<h2>Cells</h2>
{table.to_html(index=False, border=0, escape=True)}
{"".join(parts)}
{REFIT_SCRIPT}
</body></html>
"""
