"""HTML pages: ``RUN/figures/`` (one page per figure, ``logit_lens.html``, ``index.html``) and the pieces
the evaluation report shares (a local ``plotly.min.js``, so every page opens offline).

:func:`write_index` writes every figure of :data:`analysis.figures.FIGURES` under ``RUN/figures/``
with one shared ``plotly.min.js``, the logit-lens table (``logit_lens.html``) and ``index.html``,
which opens with a one-screen summary (held-out reward, the layer x iteration separability heatmap,
the logit-lens table).
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from analysis.figures import FIGURES, build_figures, reward_summary_figure
from analysis.logit_lens import read_lens
from analysis.observed import ObservedSummary
from analysis.observed_figures import separability_layers_figure
from analysis.run_data import RunData, config_summary, load_run, summary_from_metrics
from sims_lens.files import write_atomic
from sims_lens.run_folder import RunFolder

PAGES: dict[str, str] = {
    "logit_lens": "Logit lens of every observed layer's candidate direction, per iteration: the tokens it "
    "promotes and suppresses through the final norm and the unembedding",
}
"""Plain HTML pages :func:`write_index` writes next to the figures (tables, not plotly)."""

INDEX_LENS_ITERATIONS = 4
"""The logit-lens table on ``index.html`` shows this many latest iterations (``logit_lens.html`` all)."""


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
.summary{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,5fr);gap:1em;align-items:start}
@media (max-width:64em){.summary{grid-template-columns:minmax(0,1fr)}}
.scroll{max-height:45vh;overflow:auto;border:1px solid #ddd}
table.lens{font-size:85%}table.lens td{white-space:nowrap}table.lens thead th{position:sticky;top:0;background:#fff}
.up code{color:#1a7f37}.down code{color:#b42318}code{background:#f6f8fa;padding:0 2px;margin-right:3px}"""
"""The run pages' CSS. The summary is a grid of fixed column shares (not a flex row whose items grow
into the room the later ones have not yet taken), so each summary figure's panel already has its final
width when the figure's inline script draws it."""

REFIT_SCRIPT = """<script>
(function () {
  if (!window.ResizeObserver || !window.Plotly) { return; }
  document.querySelectorAll('.js-plotly-plot').forEach(function (gd) {
    new ResizeObserver(function () {
      if (gd._fullLayout && Math.abs(gd.clientWidth - gd._fullLayout.width) >= 1) {
        Plotly.Plots.resize(gd).catch(function () {});
      }
    }).observe(gd);
  });
})();
</script>"""
"""Redraws a page's plotly figures whenever one's div is no longer as wide as the figure drawn in it.

Plotly sizes a figure to its div once, when the figure's inline script runs during parsing (and
again on a window resize); a div that changes width later (a vertical scrollbar appearing as the rest
of the page arrives, the columns around it) would otherwise keep a figure wider or narrower than
itself. Goes last in the ``<body>``."""


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
{REFIT_SCRIPT}
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
