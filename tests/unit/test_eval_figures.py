"""``analysis.eval_report``: figures, tables and the index page of a ``sims-lens eval`` folder (synthetic CSV)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd
import pytest

from analysis.eval_report import (
    BASELINES,
    EVAL_COLUMNS,
    change_figure,
    format_table,
    load_eval,
    metric_figure,
    policy_order,
    summary_table,
    write_eval_report,
)

T = 12
RUNS = {"run_a": 0, "run_b": 1}
METRICS = ["reward", "reference_reward", "perplexity_under_base", "response_length", "distinct_2"]
"""Every metric but ``relevance`` (the missing one); ``win_rate_vs_base`` and ``samples_per_answer`` added below."""


def value_of(policy: str, metric: str, run: str) -> float:
    """A distinct, reproducible value per cell (iterations rise by 0.01 per step)."""
    shift = {"all": 0.0, "run_a": 0.001, "run_b": -0.001}[run]
    base = {"reward": 0.2, "reference_reward": 0.4, "perplexity_under_base": 12.0, "response_length": 38.0}
    start = base.get(metric, 0.5) + shift
    if policy == "base":
        return start
    if policy.startswith("iter_"):
        return start + 0.01 * int(policy[5:])
    return start + 0.1 * (1 + BASELINES.index(policy)) if policy in BASELINES else start - 0.05


def eval_rows(extra_policies: tuple[str, ...] = ()) -> list[dict[str, object]]:
    policies = ["base", *[f"iter_{t:03d}" for t in range(1, T + 1)], *BASELINES, *extra_policies]
    rows: list[dict[str, object]] = []
    for run, seed in [("all", ""), *RUNS.items()]:
        for policy in policies:
            metrics = [*METRICS, *([] if policy == "base" else ["win_rate_vs_base"])]
            metrics += ["samples_per_answer"]
            if policy.startswith("iter_"):
                metrics += ["reward_change", "reference_reward_change"]
            for metric in metrics:
                if metric.endswith("_change"):
                    value = 0.05 if policy != "iter_005" else -0.05
                elif metric == "samples_per_answer":
                    value = 4.0 if policy == "best_of_k" else 1.0
                else:
                    value = value_of(policy, metric, run)
                rows.append(
                    {
                        "policy": policy,
                        "run": run,
                        "seed": seed,
                        "metric": metric,
                        "value": value,
                        "ci_low": value - 0.02,
                        "ci_high": value + 0.03,
                    }
                )
    return rows


def write_eval(folder: Path, rows: list[dict[str, object]], columns: list[str] = EVAL_COLUMNS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "eval.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture
def eval_dir(tmp_path: Path) -> Path:
    return write_eval(tmp_path / "eval", eval_rows())


@pytest.fixture
def frame(eval_dir: Path) -> pd.DataFrame:
    return load_eval(eval_dir)


def test_load_eval_types_the_columns(frame: pd.DataFrame):
    assert list(frame.columns) == EVAL_COLUMNS
    assert str(frame["seed"].dtype) == "Int64"
    assert frame.loc[frame["run"] == "all", "seed"].isna().all()
    assert set(frame.loc[frame["run"] == "run_b", "seed"]) == {1}
    assert all(frame[c].dtype == float for c in ["value", "ci_low", "ci_high"])


def test_missing_file_and_columns_are_named(tmp_path: Path):
    with pytest.raises(ValueError, match=r"eval\.csv does not exist"):
        load_eval(tmp_path)
    write_eval(tmp_path, eval_rows(), columns=["policy", "run", "metric", "value"])
    with pytest.raises(ValueError, match=r"eval\.csv lacks the column\(s\) seed, ci_low, ci_high"):
        load_eval(tmp_path)
    with pytest.raises(ValueError, match=r"eval\.csv lacks"):
        write_eval_report(tmp_path)
    (tmp_path / "eval.csv").write_text("")
    with pytest.raises(ValueError, match=r"eval\.csv is empty"):
        load_eval(tmp_path)
    (tmp_path / "eval.csv").write_text(",".join(EVAL_COLUMNS) + "\nbase,all,,reward,high,0,1\n")
    with pytest.raises(ValueError, match=r"eval\.csv line 2: value = 'high' is not a number"):
        load_eval(tmp_path)
    (tmp_path / "eval.csv").write_text(",".join(EVAL_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="holds no rows"):
        write_eval_report(tmp_path)


def test_metric_figure_draws_the_iterations_with_error_bars_and_a_band_per_baseline(frame: pd.DataFrame):
    fig = metric_figure(frame, "reward")
    bars = [t for t in fig.data if t.error_y is not None and t.error_y.array is not None]
    assert len(bars) == 1
    line = bars[0]
    assert list(line.x) == list(range(T + 1))
    assert list(line.y) == pytest.approx(
        [value_of(p, "reward", "all") for p in ["base"] + [f"iter_{t:03d}" for t in range(1, T + 1)]]
    )
    assert list(line.error_y.array) == pytest.approx([0.03] * (T + 1))
    assert list(line.error_y.arrayminus) == pytest.approx([0.02] * (T + 1))
    fills = [t for t in fig.data if t.fill == "toself"]
    assert len(fills) == len(BASELINES)
    bands = {t.name: t for t in fig.data if t.legendgroup in BASELINES and t.showlegend is not False}
    assert set(bands) == set(BASELINES)
    assert list(bands["best_of_k"].y) == pytest.approx([value_of("best_of_k", "reward", "all")] * 2)
    # bands span the whole x axis, and the axis shows all 13 positions (0 labelled base)
    assert min(bands["prompting"].x) <= 0 and max(bands["prompting"].x) >= T
    assert list(fig.layout.xaxis.tickvals) == list(range(T + 1))
    assert fig.layout.xaxis.ticktext[0] == "base"
    assert "reward" in fig.layout.title.text


def test_metric_figure_per_run_missing_metric_and_unknown_run(frame: pd.DataFrame):
    fig = metric_figure(frame, "win_rate_vs_base", run="run_a")
    line = next(t for t in fig.data if t.error_y is not None and t.error_y.array is not None)
    assert list(line.x) == list(range(1, T + 1))  # no win rate for base
    assert "run_a" in fig.layout.title.text
    empty = metric_figure(frame, "relevance")
    assert not empty.data and "no relevance rows" in empty.layout.annotations[0].text
    with pytest.raises(ValueError, match=r"run 'run_z' is not in the evaluation \(runs: all, run_a, run_b\)"):
        metric_figure(frame, "reward", run="run_z")


def test_change_figure_has_a_zero_line_and_one_point_per_iteration(frame: pd.DataFrame):
    fig = change_figure(frame)
    assert [t.name for t in fig.data] == ["reward_change", "reference_reward_change"]
    for trace in fig.data:
        assert list(trace.x) == list(range(1, T + 1))
        assert trace.error_y.array is not None
        colours = list(trace.marker.color)
        assert colours[4] != colours[0]  # iteration 5 fell (interval below 0), the others rose
    zero_lines = [s for s in fig.layout.shapes if s.type == "line" and s.y0 == 0 and s.y1 == 0]
    assert len(zero_lines) == 2
    no_reference = frame[frame["metric"] != "reference_reward_change"]
    assert [t.name for t in change_figure(no_reference).data] == ["reward_change"]


def test_summary_table_order_and_cells(frame: pd.DataFrame):
    table = summary_table(frame)
    iterations = [f"iter_{t:03d}" for t in range(1, T + 1)]
    assert list(table.index) == ["base", *iterations, *BASELINES]
    assert list(table.columns) == [
        "reward",
        "reference_reward",
        "perplexity_under_base",
        "response_length",
        "distinct_2",
        "win_rate_vs_base",
        "samples_per_answer",
        "reward_change",
        "reference_reward_change",
    ]
    assert table.loc["base", "reward"] == "0.200 [0.180, 0.230]"
    assert table.loc["base", "perplexity_under_base"] == "12.00 [11.98, 12.03]"  # 2 decimals from 10 on
    assert table.loc["base", "win_rate_vs_base"] == ""
    assert table.loc["static_all", "reward_change"] == ""
    assert summary_table(frame, run="run_a").loc["base", "reward"] == "0.201 [0.181, 0.231]"
    text = format_table(table, width=100)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    assert text.count("iter_012") >= 2  # wide tables continue in a second block that repeats the policies
    assert "0.200 [0.180, 0.230]" in text
    assert re.search(r"^base .* -$", text, re.MULTILINE)  # an empty cell prints as -


def test_a_missing_interval_prints_the_value_alone(tmp_path: Path):
    rows = [r for r in eval_rows() if r["metric"] == "reward"]
    rows[0] = {**rows[0], "ci_low": "", "ci_high": ""}
    frame = load_eval(write_eval(tmp_path, rows))
    assert summary_table(frame).loc["base", "reward"] == "0.200"
    line = next(t for t in metric_figure(frame, "reward").data if t.error_y is not None and t.error_y.array is not None)
    assert list(line.error_y.array[1:]) == pytest.approx([0.03] * T)
    assert write_eval_report(tmp_path).is_file()


def test_unrecognised_policies_are_shown_after_the_baselines_as_bands(tmp_path: Path):
    frame = load_eval(write_eval(tmp_path, eval_rows(extra_policies=("mystery", "iter_000"))))
    assert policy_order(frame["policy"])[-2:] == ["mystery", "iter_000"]
    assert list(summary_table(frame).index)[-3:] == ["static_all", "mystery", "iter_000"]
    fig = metric_figure(frame, "reward")
    assert len([t for t in fig.data if t.fill == "toself"]) == len(BASELINES) + 2
    assert {"mystery", "iter_000"} <= {t.name for t in fig.data}
    page = write_eval_report(tmp_path).read_text()
    assert "Policies not recognised" in page and "mystery, iter_000" in page


def test_index_embeds_every_figure_and_opens_offline(eval_dir: Path):
    path = write_eval_report(eval_dir)
    assert path == eval_dir / "index.html"
    page = path.read_text()
    assert (eval_dir / "plotly.min.js").is_file()
    assert '<script src="plotly.min.js">' in page
    assert not re.search(r"<script[^>]+src=\"https?://", page)  # nothing fetched from the network
    expected = [*METRICS, "win_rate_vs_base", "samples_per_answer", "change"]
    for name in expected:
        assert f'id="figure-{name}"' in page and f'href="#figure-{name}"' in page
    assert 'id="figure-relevance"' not in page and "Metrics not in this evaluation: relevance" in page
    assert page.index("0.200 [0.180, 0.230]") < page.index('id="figure-reward"')  # the table comes first
    assert "over runs and prompts" in page
    assert "run_a (seed 0)" in page and "run_b (seed 1)" in page
    assert page.index("<h2>Per run</h2>") > page.index('id="figure-change"')


def test_a_single_run_gets_no_pooling_note(tmp_path: Path):
    rows = [r for r in eval_rows() if r["run"] == "run_a"]
    page = write_eval_report(write_eval(tmp_path, rows)).read_text()
    assert "over runs and prompts" not in page and "Per run" not in page
    assert "run run_a (seed 0)" in page
