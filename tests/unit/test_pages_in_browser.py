"""Every HTML page the reports write, drawn by a real headless Chromium at 1400 and 1920 px wide.

A copy of each page gets a small script (:data:`PROBE`) that, once plotly has drawn, checks every
figure: the figure is no wider than its div, its panel (the element holding it) and the page, and
every drawn point, line, fill, error bar, bar and heatmap image of every trace lies inside its
subplot's plot area (the ``rect.bg`` of that subplot), its panel and the page; the page does not
scroll sideways. The script writes what it found as JSON into the DOM, which ``chromium --headless
--dump-dom`` prints. The pages: a synthetic run's ``figures/index.html``, each figure page and
``logit_lens.html`` (written by :func:`analysis.pages.write_index`, as the report and the live
callback write them, from synthetic steering, observed activations, metrics and logit lens), and a
synthetic evaluation's ``index.html`` (:func:`analysis.eval_report.write_eval_report`).

Needs a Chrome/Chromium: ``$BROWSER_PATH``, else ``chromium`` / ``chromium-browser`` /
``google-chrome`` on ``PATH`` (``scripts/install.sh --dev`` installs Debian's ``/usr/bin/chromium``);
skipped, with that reason, only where there is none.
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from analysis.eval_report import BASELINES, EVAL_COLUMNS, eval_figures, load_eval, write_eval_report
from analysis.figures import FIGURES
from analysis.logit_lens import LENS_COLUMNS
from analysis.observed import summarize
from analysis.pages import write_index
from analysis.report import geometry_metrics
from analysis.run_data import RunData
from sims_lens.activations import PairActivations
from sims_lens.metrics import tidy_metrics
from sims_lens.steering.functions import SteeringFunction, SteeringSet

WIDTHS = (1400, 1920)
NARROW = 1280
"""Below the run pages' max width (84em plus padding, about 1390 px) the page narrows when its vertical
scrollbar appears, after the summary figures were drawn: the run summary is checked there too."""
HEIGHT = 900
ITERATIONS = 3
STEERED = (1, 3)
OBSERVED_LAYERS = 6
D_MODEL = 8
VIRTUAL_TIME_MS = 5000
"""Virtual time Chromium gives each page before it dumps the DOM (the probe runs 1.5 s after load)."""
TIMEOUT_S = 60
"""Wall-clock limit of one Chromium run."""

PROBE = r"""<script>
(function () {
  var TOL = 1.5, errors = [];
  window.addEventListener('error', function (e) { errors.push(String(e.message)); });
  function box(el) { var r = el.getBoundingClientRect(); return {l: r.left, t: r.top, r: r.right, b: r.bottom}; }
  function poke(inner, outer) {  /* px by which inner sticks out of outer (<= 0: inside) */
    return Math.max(outer.l - inner.l, inner.r - outer.r, outer.t - inner.t, inner.b - outer.b);
  }
  function owner(el) {
    var g = el.closest('.trace, .hm'), d = g && g.__data__;
    var trace = d && (Array.isArray(d) ? d[0] && d[0].trace : d.trace);
    return trace ? (trace.name || trace.type) + ' (' + trace.type + ')' : 'a trace';
  }
  function check() {
    var doc = document.documentElement, page = doc.clientWidth;
    var out = {page: page, scroll_width: doc.scrollWidth, figures: 0, subplots: 0, elements: 0, errors: errors,
               problems: []};
    if (doc.scrollWidth > page + TOL) out.problems.push('the page scrolls sideways: ' + doc.scrollWidth + ' > ' + page);
    document.querySelectorAll('.js-plotly-plot').forEach(function (gd) {
      var fl = gd._fullLayout, name = gd.id || 'a figure';
      if (!fl || !fl._plots) { out.problems.push(name + ': not drawn'); return; }
      out.figures++;
      var div = box(gd), panel = box(gd.parentElement);
      var svg = box(gd.querySelector('svg.main-svg'));
      var limit = Math.min(div.r, panel.r, page);
      if (svg.r > limit + TOL || svg.l < Math.max(div.l, panel.l, 0) - TOL) {
        out.problems.push(name + ': drawn ' + Math.round(svg.r - svg.l) + ' px wide from x=' +
          Math.round(svg.l) + ' in a div of ' + Math.round(div.r - div.l) + ' px (panel to x=' +
          Math.round(panel.r) + ', page ' + page + ')');
      }
      Object.keys(fl._plots).forEach(function (id) {
        var sp = fl._plots[id];
        if (!sp.bg || !sp.plot) { return; }
        out.subplots++;
        var bg = box(sp.bg.node());
        var area = {l: Math.max(bg.l, panel.l, 0), r: Math.min(bg.r, panel.r, page), t: bg.t, b: bg.b};
        var seen = {};
        sp.plot.node().querySelectorAll(
          '.trace path.point, .trace path.js-line, .trace path.js-fill, .trace .errorbar path, ' +
          '.barlayer .point path, .heatmaplayer image'
        ).forEach(function (el) {
          var b = box(el);
          if (b.r - b.l === 0 && b.b - b.t === 0) { return; }
          out.elements++;
          var by = poke(b, area);
          var who = owner(el);
          if (by > TOL && !seen[who]) {
            seen[who] = true;
            out.problems.push(name + ' subplot ' + id + ': ' + who + ' runs ' + Math.round(by) +
              ' px out of its panel (element x ' + Math.round(b.l) + '..' + Math.round(b.r) + ', plot area x ' +
              Math.round(area.l) + '..' + Math.round(area.r) + ', y ' + Math.round(b.t) + '..' + Math.round(b.b) +
              ' vs ' + Math.round(area.t) + '..' + Math.round(area.b) + ')');
          }
        });
      });
    });
    var pre = document.createElement('pre');
    pre.id = 'layout-check';
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener('load', function () { setTimeout(check, 1500); });
})();
</script>"""


# -- the pages ---------------------------------------------------------------------------------


def hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def steering(iteration: int, generator: torch.Generator) -> SteeringSet:
    functions = [
        SteeringFunction("add", hook(layer), {"vector": torch.randn(D_MODEL, generator=generator)}) for layer in STEERED
    ]
    return SteeringSet.from_functions(functions, iteration=iteration)


def write_run(folder: Path) -> Path:
    """``RUN/figures/`` of a finished three-iteration run (synthetic steering, observed activations, metrics,
    logit lens) as the report writes it; returns ``index.html``.

    Held-out reward rises over every iteration, so a plot that stops after iteration 1 hides it.
    """
    generator = torch.Generator().manual_seed(0)
    rows: list[tuple[int, str, str, int | None, float]] = []
    for t, reward in enumerate([0.20, 0.35, 0.55, 0.80]):
        rows += [(t, "heldout", "reward_mean", None, reward), (t, "heldout", "perplexity_under_base", None, 8.0 + t)]
        rows += [(t, "heldout", "response_length", None, 40.0 - t)]
        if t:
            rows += [(t, "heldout", "win_rate_vs_base", None, 0.5 + 0.1 * t), (t, "train", "reward_mean", None, reward)]
            rows += [(t, "train", "pair_margin_mean", None, 1.0 / t)]
    observed_rows: list[tuple[int, str, str, int | None, float]] = []
    summaries = {}
    for t in range(1, ITERATIONS + 1):
        for layer in range(OBSERVED_LAYERS):
            readable = layer == 4  # layer 4 grows readable
            observed_rows += [
                (t, "analysis", "probe_accuracy", layer, 0.6 + 0.1 * t if readable else 0.5 + 0.02 * layer),
                (t, "analysis", "probe_accuracy_null", layer, 0.5),
                (t, "analysis", "fisher_ratio", layer, float(t) if readable else 0.1),
                (t, "analysis", "candidate_norm", layer, 1.0 + layer),
                (t, "analysis", "candidate_cos_first", layer, 1.0 if t == 1 else 0.8 - 0.05 * layer),
            ]
            if t > 1:
                observed_rows.append((t, "analysis", "candidate_cos_prev", layer, 0.9 - 0.05 * layer))
        pairs = 8
        negatives = torch.randn(pairs, OBSERVED_LAYERS, D_MODEL, generator=generator)
        positives = negatives + torch.randn(pairs, OBSERVED_LAYERS, D_MODEL, generator=generator)
        positives[:, 4, 0] += 3.0 * t
        hooks = [hook(layer) for layer in range(OBSERVED_LAYERS)]
        summaries[t] = summarize(
            PairActivations(
                t,
                [f"p{i // 2}" for i in range(pairs)],
                observed_hooks=hooks,
                observed_positives=positives,
                observed_negatives=negatives,
            )
        )
    columns = ["iteration", "split", "metric", "layer", "value"]
    data = RunData(
        folder,
        config={"iterations": ITERATIONS, "layers": list(STEERED), "seed": 0},
        state={"completed_iterations": ITERATIONS},
        policies={t: steering(t, generator) for t in range(1, ITERATIONS + 1)},
        fits={t: steering(t, generator) for t in range(1, ITERATIONS + 1)},
        metrics=tidy_metrics(pd.DataFrame(rows, columns=columns)),
    )
    data.analysis = tidy_metrics(pd.concat([geometry_metrics(data), pd.DataFrame(observed_rows, columns=columns)]))
    lens = [
        (t, layer, "candidate", rank, sign, f" tok{layer}.{t}.{rank}", (6 - rank) * (1 if sign == "promoted" else -1))
        for t in range(1, ITERATIONS + 1)
        for layer in range(OBSERVED_LAYERS)
        for sign in ("promoted", "suppressed")
        for rank in range(1, 6)
    ]
    return write_index(folder, data, observed=summaries, lens=pd.DataFrame(lens, columns=LENS_COLUMNS))


def write_eval(folder: Path) -> Path:
    """``eval.csv`` of two runs and their pool: base, three iterations, the baselines, their changes."""
    folder.mkdir(parents=True)
    policies = ["base", *[f"iter_{t:03d}" for t in range(1, ITERATIONS + 1)], *BASELINES]
    metrics = ["reward", "reference_reward", "perplexity_under_base", "response_length", "win_rate_vs_base"]
    with (folder / "eval.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=EVAL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for run, seed in [("all", ""), ("run_a", 0), ("run_b", 1)]:
            for p, policy in enumerate(policies):
                names = [m for m in metrics if not (policy == "base" and m == "win_rate_vs_base")]
                names += ["reward_change", "reference_reward_change"] if policy.startswith("iter_") else []
                for metric in names:
                    value = 0.05 if metric.endswith("_change") else 0.2 + 0.05 * p + 0.01 * len(metric)
                    row = {"policy": policy, "run": run, "seed": seed, "metric": metric, "value": value}
                    writer.writerow({**row, "ci_low": value - 0.02, "ci_high": value + 0.03})
    return folder


@pytest.fixture(scope="module")
def chromium() -> str:
    found = os.environ.get("BROWSER_PATH") or next(
        (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None
    )
    if not found:
        pytest.skip("no Chrome/Chromium binary (scripts/install.sh --dev installs Debian's /usr/bin/chromium)")
    return found


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """Every page the reports write, by name, with the number of plotly figures it holds."""
    root = tmp_path_factory.mktemp("pages")
    figures = write_run(root / "run").parent
    eval_dir = write_eval(root / "eval")
    eval_index = write_eval_report(eval_dir)
    found = {"index": (figures / "index.html", 2), "logit_lens": (figures / "logit_lens.html", 0)}
    found |= {name: (figures / f"{name}.html", 1) for name in FIGURES}
    found["eval_index"] = (eval_index, len(eval_figures(load_eval(eval_dir))))
    return found


PAGE_NAMES = ["index", *FIGURES, "logit_lens", "eval_index"]
CASES = [(name, width) for name in PAGE_NAMES for width in WIDTHS] + [("index", NARROW)]


def probed_copy(page: Path) -> Path:
    """A copy of ``page`` next to it (so ``plotly.min.js`` and the links resolve) with :data:`PROBE` in its head."""
    text = page.read_text()
    head = re.search(r"<head[^>]*>", text)
    assert head, f"{page} has no <head>"
    copy = page.with_name(f"probe-{page.name}")
    copy.write_text(text[: head.end()] + PROBE + text[head.end() :])
    return copy


def render(browser: str, page: Path, width: int) -> dict[str, Any]:
    """What :data:`PROBE` found in ``page`` drawn by ``browser`` in a ``width`` x :data:`HEIGHT` window."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                f"--user-data-dir={profile}",
                f"--window-size={width},{HEIGHT}",
                f"--virtual-time-budget={VIRTUAL_TIME_MS}",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    found = re.search(r'<pre id="layout-check">(.*?)</pre>', done.stdout, re.S)
    if not found:
        tail = "\n".join(done.stderr.splitlines()[-5:])
        raise AssertionError(f"{page.name} at {width} px: no layout check in the DOM (exit {done.returncode}): {tail}")
    return dict(json.loads(html.unescape(found.group(1))))


@pytest.fixture(scope="module")
def drawn(chromium: str, pages: dict[str, tuple[Path, int]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Every page at every width, drawn once (a few Chromium runs at a time)."""
    copies = {name: probed_copy(path) for name, (path, _) in pages.items()}
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda case: render(chromium, copies[case[0]], case[1]), CASES))
    return dict(zip(CASES, results, strict=True))


@pytest.mark.parametrize(("name", "width"), CASES, ids=[f"{name}-{width}" for name, width in CASES])
def test_every_trace_lies_inside_its_panel(
    drawn: dict[tuple[str, int], dict[str, Any]], pages: dict[str, tuple[Path, int]], name: str, width: int
) -> None:
    found = drawn[(name, width)]
    expected_figures = pages[name][1]
    assert found["errors"] == [], f"{name} at {width} px: script errors {found['errors']}"
    assert found["figures"] == expected_figures, f"{name} at {width} px: {found['figures']} figures drawn"
    if expected_figures:
        assert found["subplots"] >= 1 and found["elements"] >= 1, f"{name} at {width} px: nothing drawn: {found}"
    assert found["page"] <= width and found["problems"] == [], f"{name} at {width} px: " + "; ".join(found["problems"])
