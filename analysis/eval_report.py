"""Figures and an index page of a ``sims-lens eval`` folder: SIMS by iteration against the baselines.

Reads ``EVAL_DIR/eval.csv`` (tidy; columns :data:`EVAL_COLUMNS`), one row per (policy, run, metric)
with a value and its interval. ``policy`` is ``base`` (x = 0), ``iter_NNN`` (the SIMS policy after
iteration NNN, x = NNN) or a baseline (:data:`BASELINES`). ``run`` is a run folder's name, or ``all``
for the estimate pooled over every run (hierarchical bootstrap over runs and prompts); ``seed`` is the
run's seed, empty for ``all``. Any metric may be missing, and a metric may be missing for some policies.

- :func:`load_eval`: the table, typed
- :func:`metric_figure`: one metric against iteration with error bars, each baseline as a band
- :func:`change_figure`: the change of reward (and reference reward) from the previous iteration
- :func:`summary_table` / :func:`format_table`: ``value [lo, hi]`` cells, policies x metrics; terminal text
- :func:`write_eval_report`: ``EVAL_DIR/index.html`` (table, then every figure embedded; opens offline)

A policy that is none of these (not ``base``, not ``iter_NNN`` with NNN >= 1, not a baseline) is not
dropped: it is placed after the baselines, drawn as a band like them, and named on the index page.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.pages import ensure_plotlyjs
from analysis.plots import color, empty_figure
from sims_lens.eval_runs import BASELINES, EVAL_COLUMNS, EVAL_FILE
from sims_lens.files import write_atomic

INDEX_FILE = "index.html"
POOLED_RUN = "all"
BASE = "base"
METRICS: dict[str, str] = {
    "reward": "held-out reward (the oracle's mean score)",
    "reference_reward": "held-out reward under the reference oracle",
    "relevance": "relevance to the prompt (cosine of MiniLM sentence embeddings of prompt and response)",
    "perplexity_under_base": "perplexity of the responses under the base model (fluency cost; lower is more fluent)",
    "response_length": "mean response length (tokens)",
    "distinct_2": "distinct token bigrams over all bigrams of a response (low = repetition)",
    "win_rate_vs_base": "share of paired comparisons won against the base model (ties 1/2; 0.5 = no change)",
    "samples_per_answer": "responses sampled per answer (generation cost)",
}
"""The metrics drawn one figure each, in page and table order, with a one-line description."""
CHANGE_METRICS: dict[str, str] = {
    "reward_change": "reward",
    "reference_reward_change": "reference_reward",
}
"""The change rows (iteration t minus iteration t-1; iteration 1 minus base), by the metric they change."""
_ITERATION = re.compile(r"iter_(\d+)")
_FLOAT_COLUMNS = ["value", "ci_low", "ci_high"]
_GREEN, _RED, _GREY = "#2ca02c", "#d62728", "#888888"
_HOVER = "%{customdata[0]}: %{y:.4g} [%{customdata[1]:.4g}, %{customdata[2]:.4g}]<extra></extra>"


def load_eval(eval_dir: str | Path) -> pd.DataFrame:
    """``EVAL_DIR/eval.csv`` (or the CSV file itself) as a typed table of :data:`EVAL_COLUMNS`.

    ``policy``, ``run``, ``metric`` are strings (never read as NaN), ``seed`` is a nullable integer
    (empty for ``all``), ``value``, ``ci_low``, ``ci_high`` are floats (empty = NaN). Extra columns are
    dropped. ValueError, naming the file, if it is missing, unreadable, lacks a column or holds a bad value.
    """
    path = Path(eval_dir)
    if path.is_dir() or path.suffix != ".csv":
        path = path / EVAL_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist (run `sims-lens eval` first, or pass the folder it wrote)")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty; expected the columns {', '.join(EVAL_COLUMNS)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable CSV file: {error}") from None
    missing = [c for c in EVAL_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {', '.join(missing)}; expected {', '.join(EVAL_COLUMNS)} "
            f"(found {', '.join(map(str, raw.columns)) or 'none'})"
        )
    frame = raw[EVAL_COLUMNS].copy()
    for column in ["policy", "run", "metric"]:
        frame[column] = frame[column].str.strip()
        empty = frame.index[frame[column] == ""]
        if len(empty):
            raise ValueError(f"{path} line {int(empty[0]) + 2}: empty {column}")
    for column in [*_FLOAT_COLUMNS, "seed"]:
        frame[column] = _numbers(path, frame[column], column)
    seeds = frame["seed"].dropna()
    if (seeds != seeds.round()).any():
        raise ValueError(f"{path}: seed {seeds[seeds != seeds.round()].iloc[0]!r} is not an integer")
    frame["seed"] = frame["seed"].astype("Int64")
    return frame.reset_index(drop=True)


def _numbers(path: Path, column: pd.Series, name: str) -> pd.Series:
    text = column.str.strip()
    out = pd.Series(np.nan, index=column.index, dtype=float)
    for i, cell in text[text != ""].items():
        try:
            out[i] = float(cell)
        except ValueError:
            raise ValueError(f"{path} line {int(i) + 2}: {name} = {cell!r} is not a number") from None
    return out


def policy_iteration(policy: str) -> int | None:
    """The x position of a policy on the iteration axis: 0 for ``base``, t for ``iter_t`` (t >= 1), else None."""
    if policy == BASE:
        return 0
    match = _ITERATION.fullmatch(policy)
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    return None


def policy_order(policies: list[str] | pd.Series) -> list[str]:
    """The distinct policies in table order: base, ``iter_*`` by iteration, the baselines, then the others.

    The others (names this module does not recognise) keep the order they first appear in.
    """
    seen = list(dict.fromkeys(str(p) for p in policies))
    on_axis = sorted((p for p in seen if policy_iteration(p) is not None), key=lambda p: (policy_iteration(p), p))
    baselines = [p for p in BASELINES if p in seen]
    others = [p for p in seen if policy_iteration(p) is None and p not in BASELINES]
    return on_axis + baselines + others


def unrecognised_policies(frame: pd.DataFrame) -> list[str]:
    """Policies that are neither ``base``, ``iter_NNN`` nor a baseline (shown after the baselines, as bands)."""
    return [p for p in policy_order(frame["policy"]) if policy_iteration(p) is None and p not in BASELINES]


def _band_policies(frame: pd.DataFrame) -> list[str]:
    """The policies drawn as horizontal bands (baselines, then unrecognised ones), whole-frame order."""
    return [p for p in policy_order(frame["policy"]) if policy_iteration(p) is None]


def runs_of(frame: pd.DataFrame) -> list[str]:
    """The runs of the table: ``all`` first (if present), then the others in order of appearance."""
    runs = list(dict.fromkeys(frame["run"]))
    return [r for r in runs if r == POOLED_RUN] + [r for r in runs if r != POOLED_RUN]


def _run_rows(frame: pd.DataFrame, run: str) -> pd.DataFrame:
    """The rows of one run, the last row kept where a (policy, metric) repeats. ValueError for an unknown run."""
    rows = frame[frame["run"] == run]
    if rows.empty:
        known = ", ".join(runs_of(frame)) or "none"
        raise ValueError(f"run {run!r} is not in the evaluation (runs: {known})")
    return rows.drop_duplicates(["policy", "metric"], keep="last")


def _run_name(frame: pd.DataFrame, run: str) -> str:
    """``NAME (seed S)`` where the run's rows agree on one seed, else ``NAME``."""
    seeds = frame.loc[frame["run"] == run, "seed"].dropna().unique()
    return f"{run} (seed {seeds[0]})" if len(seeds) == 1 else run


def _run_label(frame: pd.DataFrame, run: str) -> str:
    if run == POOLED_RUN:
        others = [r for r in runs_of(frame) if r != POOLED_RUN]
        return f"pooled over {len(others)} runs" if len(others) > 1 else "all runs"
    return f"run {_run_name(frame, run)}"


def _x_range(rows: pd.DataFrame) -> tuple[int, int]:
    """The iterations the run's rows cover (every metric), so all its figures share one x axis."""
    xs = [x for x in (policy_iteration(p) for p in rows["policy"].unique()) if x is not None]
    return (min(xs), max(xs)) if xs else (0, 1)


def _iteration_axis(fig: go.Figure, first: int, last: int, **where: int) -> None:
    """Integer ticks labelled ``base`` at 0, at most about 20 of them, and half a step of margin."""
    step = max(1, math.ceil((last - first + 1) / 20))
    ticks = list(range(first, last + 1, step))
    fig.update_xaxes(
        tickmode="array",
        tickvals=ticks,
        ticktext=["base" if t == 0 else str(t) for t in ticks],
        range=[first - 0.5, last + 0.5],
        **where,
    )


def _rgba(hex_color: str, alpha: float) -> str:
    value = hex_color.lstrip("#")
    r, g, b = (int(value[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _errors(rows: pd.DataFrame) -> dict[str, object]:
    """Asymmetric error bars from ``ci_low`` / ``ci_high`` (none drawn where an interval is missing)."""
    return {
        "type": "data",
        "symmetric": False,
        "array": (rows["ci_high"] - rows["value"]).clip(lower=0).to_numpy(),
        "arrayminus": (rows["value"] - rows["ci_low"]).clip(lower=0).to_numpy(),
        "thickness": 1.2,
        "width": 3,
    }


def _on_axis(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of base and ``iter_*`` with their x, sorted by iteration."""
    rows = rows.assign(x=rows["policy"].map(policy_iteration))
    return rows[rows["x"].notna()].astype({"x": int}).sort_values("x")


def metric_figure(frame: pd.DataFrame, metric: str, run: str = POOLED_RUN) -> go.Figure:
    """One metric against iteration (0 = base) with error bars; each baseline a band across the x range.

    A band is the interval ``[ci_low, ci_high]`` shaded, with a line at the value; a policy the
    module does not recognise is drawn as a band too. An empty figure says so if the run has no
    rows of the metric.
    """
    rows = _run_rows(frame, run)
    title = f"{metric}: {METRICS[metric]}" if metric in METRICS else metric
    title += f" ({_run_label(frame, run)})"
    part = rows[rows["metric"] == metric]
    if part.empty:
        return empty_figure(title, f"no {metric} rows for run {run}")
    first, last = _x_range(rows)
    x0, x1 = first - 0.5, last + 0.5
    fig = go.Figure()
    bands = _band_policies(frame)
    for i, policy in enumerate(bands):
        band = part[part["policy"] == policy]
        if band.empty:
            continue
        value, low, high = (float(band[c].iloc[0]) for c in ("value", "ci_low", "ci_high"))
        colour = color(i + 1)
        if not (math.isnan(low) or math.isnan(high)):
            fig.add_trace(
                go.Scatter(
                    x=[x0, x1, x1, x0, x0],
                    y=[low, low, high, high, low],
                    fill="toself",
                    fillcolor=_rgba(colour, 0.15),
                    line={"width": 0},
                    mode="lines",
                    name=f"{policy} interval",
                    legendgroup=policy,
                    showlegend=False,
                    hoverinfo="skip",
                )
            )
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[value, value],
                mode="lines",
                name=policy,
                legendgroup=policy,
                line={"color": colour, "dash": "dash", "width": 1.5},
                hovertemplate=f"{html.escape(policy)}: {_cell(value, low, high, 4)}<extra></extra>",
            )
        )
    line = _on_axis(part)
    if len(line):
        fig.add_trace(
            go.Scatter(
                x=line["x"],
                y=line["value"],
                error_y=_errors(line),
                customdata=line[["policy", "ci_low", "ci_high"]].to_numpy(),
                mode="lines+markers",
                name="SIMS (base, then each iteration)",
                legendrank=1,
                line={"color": color(0), "width": 2},
                marker={"size": 6},
                hovertemplate=_HOVER,
            )
        )
    if metric == "win_rate_vs_base":
        fig.add_hline(y=0.5, line_dash="dot", line_color=_GREY, annotation_text="0.5 = no change")
    _iteration_axis(fig, first, last)
    fig.update_layout(
        title=title,
        xaxis_title="iteration (0 = base model)",
        yaxis_title=metric,
        legend={"groupclick": "togglegroup"},
        height=450,
    )
    return fig


def change_figure(frame: pd.DataFrame, run: str = POOLED_RUN) -> go.Figure:
    """Change of reward (and reference reward) from the previous iteration, with error bars and a zero line.

    One panel per change metric present (they are on different oracles' scales); a point is green
    where its interval lies above zero, red where below, grey where it covers zero.
    """
    rows = _run_rows(frame, run)
    title = f"Does each iteration improve on the previous one? ({_run_label(frame, run)})"
    present = [m for m in CHANGE_METRICS if (rows["metric"] == m).any()]
    if not present:
        return empty_figure(title, f"no {' or '.join(CHANGE_METRICS)} rows for run {run}")
    fig = make_subplots(rows=len(present), cols=1, shared_xaxes=True, subplot_titles=present, vertical_spacing=0.12)
    _, last = _x_range(rows)
    for i, metric in enumerate(present, start=1):
        line = _on_axis(rows[rows["metric"] == metric])
        line = line[line["x"] >= 1]
        above, below = line["ci_low"] > 0, line["ci_high"] < 0
        fig.add_trace(
            go.Scatter(
                x=line["x"],
                y=line["value"],
                error_y=_errors(line),
                customdata=line[["policy", "ci_low", "ci_high"]].to_numpy(),
                mode="lines+markers",
                name=metric,
                line={"color": color(i - 1), "width": 1.5},
                marker={"size": 8, "color": np.where(above, _GREEN, np.where(below, _RED, _GREY))},
                hovertemplate=_HOVER.replace("%{y:", "%{y:+"),
            ),
            row=i,
            col=1,
        )
        fig.add_hline(y=0, line_color="#444444", line_width=1, row=i, col=1)
        fig.update_yaxes(title_text=f"change of {CHANGE_METRICS[metric]}", zeroline=False, row=i, col=1)
        _iteration_axis(fig, 1, max(last, 1), row=i, col=1)
    fig.update_xaxes(title_text="iteration (change from the previous one; iteration 1 from base)", row=len(present))
    fig.update_layout(
        title=f"{title}<br><sup>green: interval above 0, red: below 0, grey: covers 0</sup>",
        height=300 + 250 * len(present),
        showlegend=False,
    )
    return fig


def _decimals(values: pd.Series) -> int:
    finite = values[np.isfinite(values)].abs()
    top = float(finite.max()) if len(finite) else 0.0
    return 3 if top < 10 else 2 if top < 100 else 1 if top < 1000 else 0


def _cell(value: float, low: float, high: float, decimals: int) -> str:
    if math.isnan(value):
        return ""
    text = f"{value:.{decimals}f}"
    if math.isnan(low) or math.isnan(high):
        return text
    return f"{text} [{low:.{decimals}f}, {high:.{decimals}f}]"


def _metric_order(metrics: pd.Series) -> list[str]:
    """The distinct metrics: those of :data:`METRICS`, the change metrics, then the others as they appear."""
    seen = list(dict.fromkeys(str(m) for m in metrics))
    known = [*METRICS, *CHANGE_METRICS]
    return [m for m in known if m in seen] + [m for m in seen if m not in known]


def summary_table(frame: pd.DataFrame, run: str = POOLED_RUN) -> pd.DataFrame:
    """Policies x metrics of one run, each cell ``"value [lo, hi]"`` (``""`` where there is no row).

    Rows: base, ``iter_*`` by iteration, the baselines, then unrecognised policies. Columns: the
    metrics of :data:`METRICS`, the change metrics, then any other metric, in that order. The
    decimals are chosen per column from its largest magnitude (3 below 10, 2 below 100, ...).
    """
    rows = _run_rows(frame, run)
    columns = _metric_order(rows["metric"])
    policies = policy_order(rows["policy"])
    table = pd.DataFrame("", index=pd.Index(policies, name="policy"), columns=pd.Index(columns, name="metric"))
    for metric in columns:
        part = rows[rows["metric"] == metric]
        decimals = _decimals(pd.concat([part[c] for c in _FLOAT_COLUMNS]))
        for policy, value, low, high in part[["policy", *_FLOAT_COLUMNS]].itertuples(index=False):
            table.loc[policy, metric] = _cell(value, low, high, decimals)
    return table


def format_table(table: pd.DataFrame, width: int = 120) -> str:
    """A :func:`summary_table` as fixed-width text: the policy column, then metric columns right-aligned.

    Columns that do not fit in ``width`` characters go to a further block below, which repeats the
    policy column; an empty cell prints as ``-``.
    """
    names = [str(p) for p in table.index]
    first = max([len(str(table.index.name or "policy")), *map(len, names)])
    columns = [str(c) for c in table.columns]
    cells = {c: ["-" if not str(v) else str(v) for v in table[c]] for c in table.columns}
    widths = {str(c): max([len(str(c)), *map(len, cells[c])]) for c in table.columns}
    blocks: list[list[str]] = [[]]
    used = first
    for column in columns:
        if blocks[-1] and used + 2 + widths[column] > width:
            blocks.append([])
            used = first
        blocks[-1].append(column)
        used += 2 + widths[column]
    parts = []
    for block in blocks:
        header = str(table.index.name or "policy").ljust(first) + "".join(f"  {c.rjust(widths[c])}" for c in block)
        lines = [header, "-" * len(header)]
        for i, name in enumerate(names):
            lines.append(name.ljust(first) + "".join(f"  {cells[c][i].rjust(widths[c])}" for c in block))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def eval_figures(frame: pd.DataFrame, run: str = POOLED_RUN) -> dict[str, go.Figure]:
    """Every figure of one run, by name: one per metric present (table order), then ``change``."""
    rows = _run_rows(frame, run)
    metrics = [m for m in _metric_order(rows["metric"]) if m not in CHANGE_METRICS]
    figures = {metric: metric_figure(frame, metric, run) for metric in metrics}
    if rows["metric"].isin(list(CHANGE_METRICS)).any():
        figures["change"] = change_figure(frame, run)
    return figures


def write_eval_report(eval_dir: str | Path) -> Path:
    """Write ``EVAL_DIR/index.html`` from ``EVAL_DIR/eval.csv``; returns its path.

    The page holds the summary table of the pooled run (``all``, else the first run), then every
    metric figure and the change figure, embedded; it loads ``EVAL_DIR/plotly.min.js`` (written
    here), so it opens offline. With several runs a note says the intervals of ``all`` are over runs
    and prompts, and each run's table follows. ValueError if the file is missing, malformed or empty.
    """
    folder = Path(eval_dir)
    frame = load_eval(folder)
    if frame.empty:
        raise ValueError(f"{folder / EVAL_FILE} holds no rows; nothing to report")
    folder.mkdir(parents=True, exist_ok=True)
    ensure_plotlyjs(folder)
    path = folder / INDEX_FILE
    write_atomic(path, eval_index_html(frame, str(folder)))
    return path


def _table_html(table: pd.DataFrame) -> str:
    """A summary table as HTML with one header row (policy, then the metrics)."""
    flat = table.rename_axis(columns=None).reset_index()
    return f'<div class="wide">{flat.to_html(border=0, escape=True, index=False)}</div>'


def eval_index_html(frame: pd.DataFrame, title: str) -> str:
    """The index page of an evaluation (see :func:`write_eval_report`); loads ``plotly.min.js`` beside it."""
    runs = runs_of(frame)
    main = runs[0]
    single = [r for r in runs if r != POOLED_RUN]
    notes = []
    if main == POOLED_RUN and len(single) > 1:
        listed = ", ".join(html.escape(_run_name(frame, r)) for r in single)
        notes.append(
            f"<p><b>Intervals of <code>all</code> are over runs and prompts</b> (a hierarchical bootstrap: "
            f"runs resampled, then prompts within each run), pooled over {len(single)} runs: {listed}. "
            "Each run's own table, with intervals over its prompts only, follows the figures.</p>"
        )
    rows = _run_rows(frame, main)
    absent = [m for m in METRICS if not (rows["metric"] == m).any()]
    if absent:
        notes.append(f"<p>Metrics not in this evaluation: {html.escape(', '.join(absent))}.</p>")
    others = unrecognised_policies(frame)
    if others:
        notes.append(
            f"<p>Policies not recognised (listed after the baselines, drawn as bands): "
            f"{html.escape(', '.join(others))}.</p>"
        )
    figures = eval_figures(frame, main)
    contents = "".join(f'<li><a href="#figure-{name}">{html.escape(name)}</a></li>' for name in figures)
    embedded = "".join(
        fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{name}") for name, fig in figures.items()
    )
    per_run = "".join(
        f"<h3>{html.escape(_run_label(frame, r))}</h3>{_table_html(summary_table(frame, r))}" for r in runs if r != main
    )
    per_run = f"<h2>Per run</h2>{per_run}" if per_run else ""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>SIMS evaluation {html.escape(title)}</title>
<script src="plotly.min.js"></script>
<style>body{{font-family:sans-serif;max-width:80em;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{padding:2px 10px;text-align:right;white-space:nowrap}}tr:nth-child(even){{background:#f4f4f4}}
td:first-child,th:first-child{{text-align:left}}.wide{{overflow-x:auto}}</style></head>
<body>
<h1>SIMS evaluation: {html.escape(title)}</h1>
<h2>Summary ({html.escape(_run_label(frame, main))}): value [interval]</h2>
{_table_html(summary_table(frame, main))}
{"".join(notes)}
<h2>Figures</h2>
<ul>{contents}</ul>
{embedded}
{per_run}
</body></html>
"""
