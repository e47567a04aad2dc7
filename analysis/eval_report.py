"""Figures and an index page of a ``sims-lens eval`` folder: SIMS by iteration against the baselines.

Reads ``EVAL_DIR/eval.csv`` (tidy; columns :data:`EVAL_COLUMNS`), one row per (policy, run, metric)
with a value and its interval. ``policy`` is ``base`` (x = 0), ``iter_NNN`` (the SIMS policy after
iteration NNN, x = NNN), a baseline (:data:`BASELINES`), or a variant of one of these: ``NAME@iter_NNN``
(a baseline at the norm of iteration NNN) or ``NAMExM`` (scaled by M), placed after its root name.
``run`` is a run folder's name, or ``all`` for the estimate pooled over every run (hierarchical
bootstrap over runs and prompts); ``seed`` is the run's seed, empty for ``all``. Any metric may be
missing, and a metric may be missing for some policies. ``EVAL_DIR/differences.csv``
(:data:`DIFFERENCE_COLUMNS`) holds the paired differences between policies, if eval wrote it.

- :func:`load_eval`: the table, typed
- :func:`metric_figure`: one metric against iteration with error bars, each baseline as a band
- :func:`change_figure`: the change of reward (and reference reward) from the previous iteration
- :func:`reward_kl_figure`: reward against KL to base, one point per policy (what each gain costs)
- :func:`summary_table` / :func:`format_table`: ``value [lo, hi]`` cells, policies x metrics; terminal text
- :func:`load_differences` / :func:`format_differences`: ``differences.csv``, typed; terminal text
- :func:`monotonic_runs` / :func:`monotonicity_line`: in how many runs each iteration beat the previous one
- :func:`write_eval_report`: ``EVAL_DIR/index.html`` (tables, then every figure embedded; opens offline)

A policy that is none of these (not ``base``, not ``iter_NNN`` with NNN >= 1, not a baseline, not a
variant of one) is not dropped: it is placed after the baselines, drawn as a band like them, and named
on the index page.
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
from analysis.plots import band_trace, color, empty_figure
from sims_lens.differences import DIFFERENCE_COLUMNS, DIFFERENCES_FILE
from sims_lens.eval_runs import BASELINES, EVAL_COLUMNS, EVAL_FILE
from sims_lens.files import write_atomic

INDEX_FILE = "index.html"
POOLED_RUN = "all"
BASE = "base"
METRICS: dict[str, str] = {
    "reward": "held-out reward (the oracle's mean score)",
    "reference_reward": "held-out reward under the reference oracle",
    "relevance": "relevance to the prompt (cosine of MiniLM sentence embeddings of prompt and response)",
    "kl_to_base": "KL to base (nats/response)",
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
_VARIANT = re.compile(r"(?P<root>.+?)(?:@iter_(?P<at>\d+))?(?:x(?P<times>\d+(?:\.\d*)?(?:e[+-]?\d+)?))?")
"""``NAME``, ``NAME@iter_NNN`` (at iteration NNN's norm), ``NAMExM`` (scaled by M; as ``{M:g}`` writes it)."""
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
    raw = _read_text_csv(path, EVAL_COLUMNS, ValueError)
    missing = [c for c in EVAL_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {', '.join(missing)}; expected {', '.join(EVAL_COLUMNS)} "
            f"(found {', '.join(map(str, raw.columns)) or 'none'})"
        )
    frame = _stripped(raw[EVAL_COLUMNS].copy(), ["policy", "run", "metric"], path, ValueError)
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


def _is_root(policy: str) -> bool:
    return policy_iteration(policy) is not None or policy in BASELINES


def policy_root(policy: str) -> str | None:
    """The policy a name is, or is a variant of: ``static_first_matched@iter_001`` -> ``static_first_matched``,
    ``iter_003x1.5`` -> ``iter_003``; ``base``, ``iter_NNN`` and a baseline are their own root. None if unrecognised.
    """
    if _is_root(policy):
        return policy
    match = _VARIANT.fullmatch(policy)
    if match and (match["at"] or match["times"]) and _is_root(match["root"]):
        return match["root"]
    return None


def _variant_key(policy: str) -> tuple[float, float]:
    """(iteration, multiplier) of a variant, for sorting after its root: no ``@iter`` = last, no ``xM`` = 1."""
    match = _VARIANT.fullmatch(policy)
    at, times = (match["at"], match["times"]) if match else (None, None)
    return (int(at) if at else math.inf, float(times) if times else 1.0)


def policy_order(policies: list[str] | pd.Series) -> list[str]:
    """The distinct policies in table order: base, ``iter_*`` by iteration, the baselines, then the others.

    Each variant (``NAME@iter_NNN``, ``NAMExM``) follows its root name, variants of one root by
    iteration, then multiplier. The others (names this module does not recognise) keep the order
    they first appear in.
    """
    seen = list(dict.fromkeys(str(p) for p in policies))
    named = {r for r in map(policy_root, seen) if r is not None}
    on_axis = sorted((r for r in named if r not in BASELINES), key=lambda r: (policy_iteration(r), r))
    roots = on_axis + [r for r in BASELINES if r in named]
    variants = {r: sorted((p for p in seen if p != r and policy_root(p) == r), key=_variant_key) for r in roots}
    ordered = [p for r in roots for p in ([r] if r in seen else []) + variants[r]]
    return ordered + [p for p in seen if policy_root(p) is None]


def unrecognised_policies(frame: pd.DataFrame) -> list[str]:
    """Policies that are neither ``base``, ``iter_NNN``, a baseline nor a variant of one (shown last, as bands)."""
    return [p for p in policy_order(frame["policy"]) if policy_root(p) is None]


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
            fig.add_trace(band_trace([x0, x1], [low, low], [high, high], policy, fillcolor=_rgba(colour, 0.15)))
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


def reward_kl_figure(frame: pd.DataFrame, run: str = POOLED_RUN) -> go.Figure:
    """Reward against KL to base, one point per policy with both, error bars both ways: what each gain costs.

    Base sits at KL 0 (its KL is 0 by definition, also where the row is missing); base and the
    iterations are joined by a line in order; Best-of-K (its analytic KL, a zero-width interval) is a
    star; every other policy is its own point, coloured as its band in :func:`metric_figure`.
    """
    rows = _run_rows(frame, run)
    title = f"Reward against KL to base: what each policy's gain costs ({_run_label(frame, run)})"
    reward = rows[rows["metric"] == "reward"].set_index("policy")[_FLOAT_COLUMNS]
    kl = rows[rows["metric"] == "kl_to_base"].set_index("policy")[_FLOAT_COLUMNS]
    if BASE in reward.index and BASE not in kl.index:
        kl.loc[BASE] = [0.0, np.nan, np.nan]
    points = reward.join(kl, lsuffix="_reward", rsuffix="_kl", how="inner")
    points = points[points["value_reward"].notna() & points["value_kl"].notna()]
    if points.empty:
        return empty_figure(title, f"no policy of run {run} has both reward and kl_to_base rows")
    points = points.loc[[p for p in policy_order(list(points.index)) if p in points.index]]
    fig = go.Figure()
    line = [p for p in points.index if policy_iteration(p) is not None]
    if line:
        fig.add_trace(_kl_points(points.loc[line], "SIMS (base, then each iteration)", color(0), "lines+markers"))
    bands = _band_policies(frame)
    for policy in (p for p in points.index if policy_iteration(p) is None):
        trace = _kl_points(points.loc[[policy]], policy, color(bands.index(policy) + 1), "markers")
        if policy == "best_of_k":
            trace.marker.update(symbol="star", size=14, line={"width": 1, "color": "#222222"})
        elif policy_root(policy) != policy:
            trace.marker.update(symbol="diamond")
        fig.add_trace(trace)
    fig.add_vline(x=0, line_dash="dot", line_color=_GREY)
    fig.update_layout(
        title=f"{title}<br><sup>up and to the left is better: more reward for less change of the model</sup>",
        xaxis_title=METRICS["kl_to_base"],
        yaxis_title="reward",
        height=500,
    )
    return fig


def _kl_points(points: pd.DataFrame, name: str, colour: str, mode: str) -> go.Scatter:
    """A scatter of ``points`` (a :func:`reward_kl_figure` join, by policy) with error bars on both axes."""

    def errors(suffix: str) -> dict[str, object]:
        part = points[[f"{c}_{suffix}" for c in _FLOAT_COLUMNS]]
        return _errors(part.set_axis(_FLOAT_COLUMNS, axis=1))

    columns = ["ci_low_reward", "ci_high_reward", "value_kl", "ci_low_kl", "ci_high_kl"]
    return go.Scatter(
        x=points["value_kl"],
        y=points["value_reward"],
        error_x=errors("kl"),
        error_y=errors("reward"),
        customdata=np.column_stack([points.index.to_numpy(dtype=object), points[columns].to_numpy()]),
        mode=mode,
        name=name,
        line={"color": colour, "width": 2},
        marker={"size": 9, "color": colour},
        hovertemplate=(
            "%{customdata[0]}<br>reward %{y:.4g} [%{customdata[1]:.4g}, %{customdata[2]:.4g}]"
            "<br>KL to base %{x:.4g} [%{customdata[4]:.4g}, %{customdata[5]:.4g}] nats<extra></extra>"
        ),
    )


def _decimals(values: pd.Series) -> int:
    finite = values[np.isfinite(values)].abs()
    top = float(finite.max()) if len(finite) else 0.0
    return 3 if top < 10 else 2 if top < 100 else 1 if top < 1000 else 0


def _cell(value: float, low: float, high: float, decimals: int, signed: bool = False) -> str:
    if math.isnan(value):
        return ""
    form = f"{'+' if signed else ''}.{decimals}f"
    text = format(value, form)
    if math.isnan(low) or math.isnan(high):
        return text
    return f"{text} [{format(low, form)}, {format(high, form)}]"


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


class DifferencesNotFoundError(FileNotFoundError):
    """``EVAL_DIR/differences.csv`` does not exist (an evaluation from before it was written, or not one)."""


class DifferencesFormatError(ValueError):
    """``differences.csv`` is unreadable, lacks or adds a column, or holds a bad value."""


def load_differences(eval_dir: str | Path) -> pd.DataFrame:
    """``EVAL_DIR/differences.csv`` (or the CSV file itself) as a typed table of exactly :data:`DIFFERENCE_COLUMNS`.

    ``policy`` (``RUN/POLICY`` for a run's own rows), ``baseline`` and ``metric`` are strings;
    ``value``, ``ci_low``, ``ci_high`` floats (empty = NaN). :class:`DifferencesNotFoundError` if the
    file is missing; :class:`DifferencesFormatError`, naming the file, if its header is not exactly
    :data:`DIFFERENCE_COLUMNS` in order or a cell is bad.
    """
    path = Path(eval_dir)
    if path.is_dir() or path.suffix != ".csv":
        path = path / DIFFERENCES_FILE
    if not path.is_file():
        raise DifferencesNotFoundError(
            f"{path} does not exist (run `sims-lens eval` to write it, or pass the folder it wrote)"
        )
    raw = _read_text_csv(path, DIFFERENCE_COLUMNS, DifferencesFormatError)
    if list(raw.columns) != DIFFERENCE_COLUMNS:
        found = ", ".join(map(str, raw.columns)) or "none"
        raise DifferencesFormatError(
            f"{path} has the columns {found}; expected exactly {', '.join(DIFFERENCE_COLUMNS)}"
        )
    frame = _stripped(raw.copy(), ["policy", "baseline", "metric"], path, DifferencesFormatError)
    for column in _FLOAT_COLUMNS:
        try:
            frame[column] = _numbers(path, frame[column], column)
        except ValueError as error:
            raise DifferencesFormatError(str(error)) from None
    return frame.reset_index(drop=True)


def _read_text_csv(path: Path, expected: list[str], error: type[Exception]) -> pd.DataFrame:
    """Every cell of a CSV file as text (never NaN); ``error``, naming the file, if it is empty or unreadable."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise error(f"{path} is empty; expected the columns {', '.join(expected)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as problem:
        raise error(f"{path} is not a readable CSV file: {problem}") from None


def _stripped(frame: pd.DataFrame, columns: list[str], path: Path, error: type[Exception]) -> pd.DataFrame:
    """``frame`` with these text columns stripped; ``error`` naming the line of the first empty cell."""
    for column in columns:
        frame[column] = frame[column].str.strip()
        empty = frame.index[frame[column] == ""]
        if len(empty):
            raise error(f"{path} line {int(empty[0]) + 2}: empty {column}")
    return frame


def excludes_zero(frame: pd.DataFrame) -> pd.Series:
    """Rows whose interval lies wholly above or below 0 (False where it is missing)."""
    return (frame["ci_low"] > 0) | (frame["ci_high"] < 0)


def differences_table(frame: pd.DataFrame) -> pd.DataFrame:
    """A :func:`load_differences` table as text cells, in file order: ``policy - baseline``, metric,
    ``value [lo, hi]`` (signed; decimals per metric as in :func:`summary_table`), ``*`` where the interval excludes 0.
    """
    cells = []
    decimals = {
        m: _decimals(pd.concat([part[c] for c in _FLOAT_COLUMNS])) for m, part in frame.groupby("metric", sort=False)
    }
    for row, marked in zip(frame.itertuples(index=False), excludes_zero(frame), strict=True):
        cell = _cell(row.value, row.ci_low, row.ci_high, decimals[row.metric], signed=True)
        cells.append([f"{row.policy} - {row.baseline}", row.metric, cell or "-", "*" if marked else ""])
    return pd.DataFrame(cells, columns=["policy - baseline", "metric", "difference [interval]", "excludes 0"])


def format_differences(frame: pd.DataFrame) -> str:
    """A :func:`load_differences` table as fixed-width text for the terminal (see :func:`differences_table`)."""
    if frame.empty:
        return "no paired differences"
    table = differences_table(frame)
    names, metrics, cells, marks = (table[c].tolist() for c in table.columns)
    width = [max(len(h), *map(len, col)) for h, col in zip(table.columns[:3], [names, metrics, cells], strict=True)]
    header = f"{table.columns[0]:<{width[0]}}  {table.columns[1]:<{width[1]}}  {table.columns[2]:>{width[2]}}"
    lines = [header, "-" * len(header)]
    for name, metric, cell, mark in zip(names, metrics, cells, marks, strict=True):
        lines.append(f"{name:<{width[0]}}  {metric:<{width[1]}}  {cell:>{width[2]}} {mark}".rstrip())
    lines.append("* the 95% interval excludes 0 (paired over prompts, and over runs where pooled)")
    return "\n".join(lines)


def monotonic_runs(frame: pd.DataFrame, metric: str = "reward") -> tuple[int, int]:
    """(R, S): of the S single runs (not ``all``) with ``metric`` at two or more of base, iter_001, ...,
    the R in which it rose strictly at every step (base -> iter_001 -> ... -> the last iteration).

    A step joins consecutive iterations present in the run, so a missing iteration is skipped over.
    """
    rising, counted = 0, 0
    for run in runs_of(frame):
        if run == POOLED_RUN:
            continue
        rows = _run_rows(frame, run)
        line = _on_axis(rows[(rows["metric"] == metric) & rows["value"].notna()])
        if len(line) < 2:
            continue
        counted += 1
        rising += bool((np.diff(line["value"].to_numpy()) > 0).all())
    return rising, counted


def monotonicity_line(frame: pd.DataFrame, metric: str = "reward") -> str:
    """``"reward improved at every step in 3 of 5 runs"`` (:func:`monotonic_runs`)."""
    rising, counted = monotonic_runs(frame, metric)
    if not counted:
        return f"no run has {metric} at base and an iteration (or two iterations)"
    return f"{metric} improved at every step in {rising} of {counted} run{'s' if counted != 1 else ''}"


def eval_figures(frame: pd.DataFrame, run: str = POOLED_RUN) -> dict[str, go.Figure]:
    """Every figure of one run, by name: one per metric present (table order), ``reward_kl``, then ``change``."""
    rows = _run_rows(frame, run)
    metrics = [m for m in _metric_order(rows["metric"]) if m not in CHANGE_METRICS]
    figures = {metric: metric_figure(frame, metric, run) for metric in metrics}
    if {"reward", "kl_to_base"} <= set(rows["metric"]):
        figures["reward_kl"] = reward_kl_figure(frame, run)
    if rows["metric"].isin(list(CHANGE_METRICS)).any():
        figures["change"] = change_figure(frame, run)
    return figures


def write_eval_report(eval_dir: str | Path) -> Path:
    """Write ``EVAL_DIR/index.html`` from ``EVAL_DIR/eval.csv``; returns its path.

    The page holds the summary table of the pooled run (``all``, else the first run), in how many
    runs reward rose at every step, the paired differences of ``EVAL_DIR/differences.csv`` (left out
    if there is none), then every metric figure, the reward-KL figure and the change figure,
    embedded; it loads ``EVAL_DIR/plotly.min.js`` (written here), so it opens offline. With several
    runs a note says the intervals of ``all`` are over runs and prompts, and each run's table
    follows. ValueError if ``eval.csv`` is missing, malformed or empty, or ``differences.csv`` malformed.
    """
    folder = Path(eval_dir)
    frame = load_eval(folder)
    if frame.empty:
        raise ValueError(f"{folder / EVAL_FILE} holds no rows; nothing to report")
    differences = load_differences(folder) if (folder / DIFFERENCES_FILE).is_file() else None
    folder.mkdir(parents=True, exist_ok=True)
    ensure_plotlyjs(folder)
    path = folder / INDEX_FILE
    write_atomic(path, eval_index_html(frame, str(folder), differences))
    return path


def _table_html(table: pd.DataFrame) -> str:
    """A summary table as HTML with one header row (policy, then the metrics)."""
    flat = table.rename_axis(columns=None).reset_index()
    return f'<div class="wide">{flat.to_html(border=0, escape=True, index=False)}</div>'


def _differences_html(differences: pd.DataFrame | None) -> str:
    if differences is None:
        return ""
    if differences.empty:
        return f"<h2>Paired differences</h2><p>{DIFFERENCES_FILE} holds no rows.</p>"
    table = differences_table(differences).to_html(border=0, escape=True, index=False)
    return (
        f"<h2>Paired differences ({DIFFERENCES_FILE}): value [interval]</h2>"
        "<p>Each policy minus its baseline prompt by prompt (same prompts, same seeds); "
        "* where the 95% interval excludes 0.</p>"
        f'<div class="wide">{table}</div>'
    )


def eval_index_html(frame: pd.DataFrame, title: str, differences: pd.DataFrame | None = None) -> str:
    """The index page of an evaluation (see :func:`write_eval_report`); loads ``plotly.min.js`` beside it.

    ``differences``: a :func:`load_differences` table, shown after the summary (None: no such section).
    """
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
    steps = [monotonicity_line(frame, m) for m in CHANGE_METRICS.values() if (frame["metric"] == m).any()]
    steady = "".join(f"<p><b>{html.escape(line)}</b> (single runs; strictly, from base on).</p>" for line in steps)
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
{steady}
{"".join(notes)}
{_differences_html(differences)}
<h2>Figures</h2>
<ul>{contents}</ul>
{embedded}
{per_run}
</body></html>
"""
