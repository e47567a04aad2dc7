"""``analysis.eval_report``: figures, tables and the index page of a ``sims-lens eval`` folder (synthetic CSV)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd
import pytest

from analysis.eval_report import (
    BASELINES,
    DIFFERENCE_COLUMNS,
    EVAL_COLUMNS,
    DifferencesFormatError,
    DifferencesNotFoundError,
    change_figure,
    eval_figures,
    format_differences,
    format_table,
    load_differences,
    load_eval,
    metric_figure,
    monotonic_runs,
    monotonicity_line,
    policy_order,
    policy_root,
    reward_kl_figure,
    summary_table,
    unrecognised_policies,
    write_eval_report,
)
from analysis.eval_report import METRICS as METRIC_LABELS

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
    if policy.startswith("iter_") and policy[5:].isdigit():
        return start + 0.01 * int(policy[5:])
    return start + 0.1 * (1 + BASELINES.index(policy)) if policy in BASELINES else start - 0.05


def eval_rows(extra_policies: tuple[str, ...] = ()) -> list[dict[str, object]]:
    policies = ["base", *[f"iter_{t:03d}" for t in range(1, T + 1)], *BASELINES, *extra_policies]
    rows: list[dict[str, object]] = []
    for run, seed in [("all", ""), *RUNS.items()]:
        for policy in policies:
            metrics = [*METRICS, *([] if policy == "base" else ["win_rate_vs_base"])]
            metrics += ["samples_per_answer"]
            if policy.startswith("iter_") and policy[5:].isdigit():
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


def write_csv(path: Path, rows: list[dict[str, object]], columns: list[str]) -> Path:
    """``rows`` as a CSV file at ``path`` (its folder made); returns the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path.parent


def write_eval(folder: Path, rows: list[dict[str, object]], columns: list[str] = EVAL_COLUMNS) -> Path:
    return write_csv(folder / "eval.csv", rows, columns)


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
    assert list(summary_table(frame).index)[-3:] == [BASELINES[-1], "mystery", "iter_000"]
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


def test_variants_follow_their_root_and_are_recognised():
    policies = [
        "fresh_pairsx0.5",
        "static_all",
        "iter_002",
        "static_first_matched@iter_002",
        "fresh_pairs",
        "iter_003x1.5",
        "static_first_matchedx1.5",
        "best_of_k",
        "static_first_matched@iter_001",
        "static_first_matched",
        "fresh_pairs@iter_001",
        "iter_003",
        "iter_003x0.5",
        "mysteryx2",
        "base",
        "iter_001",
        "iter_000x2",
    ]
    assert policy_order(policies) == [
        "base",
        "iter_001",
        "iter_002",
        "iter_003",
        "iter_003x0.5",
        "iter_003x1.5",
        "best_of_k",
        "static_all",
        "static_first_matched",
        "static_first_matched@iter_001",
        "static_first_matched@iter_002",
        "static_first_matchedx1.5",
        "fresh_pairs",
        "fresh_pairs@iter_001",
        "fresh_pairsx0.5",
        "mysteryx2",
        "iter_000x2",
    ]
    assert policy_root("static_first_matched@iter_002") == "static_first_matched"
    assert policy_root("iter_003x1.5") == "iter_003"
    assert policy_root("mysteryx2") is None
    rows = [{"policy": p, "run": "all", "metric": "reward", "value": 0.1} for p in policies]
    assert unrecognised_policies(pd.DataFrame(rows)) == ["mysteryx2", "iter_000x2"]


def kl_rows(tmp_path: Path) -> pd.DataFrame:
    """The synthetic evaluation, with ``kl_to_base`` for every policy but base (analytic for best_of_k)."""
    rows = eval_rows(extra_policies=("iter_012x1.5", "static_first_matched@iter_006"))
    for row in [r for r in rows if r["metric"] == "reward" and r["policy"] != "base"]:
        kl = 0.7 if row["policy"] == "best_of_k" else 0.05 + 0.01 * len(str(row["policy"]))
        spread = (0.0, 0.0) if row["policy"] == "best_of_k" else (0.01, 0.02)
        rows.append({**row, "metric": "kl_to_base", "value": kl, "ci_low": kl - spread[0], "ci_high": kl + spread[1]})
    return load_eval(write_eval(tmp_path, rows))


def test_reward_kl_figure_has_one_point_per_policy_with_error_bars(tmp_path: Path):
    frame = kl_rows(tmp_path)
    assert "kl_to_base" in METRIC_LABELS and METRIC_LABELS["kl_to_base"] == "KL to base (nats/response)"
    fig = reward_kl_figure(frame)
    policies = policy_order(frame["policy"])
    points = [p for trace in fig.data for p in trace.customdata[:, 0]]
    assert sorted(points) == sorted(policies) and len(points) == len(policies)
    line = fig.data[0]
    assert list(line.customdata[:, 0]) == ["base", *[f"iter_{t:03d}" for t in range(1, T + 1)]]
    assert line.mode == "lines+markers" and line.x[0] == 0  # base at KL 0 though it has no kl row
    for trace in fig.data:
        assert trace.error_x.array is not None and trace.error_y.array is not None
    best = next(t for t in fig.data if t.name == "best_of_k")
    assert best.marker.symbol == "star" and list(best.error_x.array) == [0.0] and best.x[0] == 0.7
    assert "%{customdata[0]}" in best.hovertemplate
    assert "reward_kl" in eval_figures(frame)
    assert "reward_kl" not in eval_figures(load_eval(write_eval(tmp_path, eval_rows())))
    assert not reward_kl_figure(frame[frame["metric"] != "kl_to_base"]).data[1:]  # base alone: one point


DIFFERENCES = [
    dict(zip(DIFFERENCE_COLUMNS, row, strict=True))
    for row in [
        ("iter_012", "best_of_k", "reward", 0.1234, 0.05, 0.2),
        ("iter_001", "base", "reward", 0.01, -0.02, 0.04),
        ("run_a/iter_012", "base", "kl_to_base", 1.5, 1.2, 1.8),
    ]
]


def write_differences(folder: Path, rows: list[dict[str, object]], columns: list[str] = DIFFERENCE_COLUMNS) -> Path:
    return write_csv(folder / "differences.csv", rows, columns)


def test_load_differences_names_a_missing_file_and_rejects_other_columns(tmp_path: Path):
    with pytest.raises(DifferencesNotFoundError, match=r"differences\.csv does not exist \(run `sims-lens eval`"):
        load_differences(tmp_path)
    write_differences(tmp_path, DIFFERENCES, columns=["policy", "baseline", "metric", "value"])
    with pytest.raises(DifferencesFormatError, match=r"expected exactly policy, baseline, metric, value, ci_low"):
        load_differences(tmp_path)
    write_differences(tmp_path, DIFFERENCES, columns=[*DIFFERENCE_COLUMNS, "extra"])
    with pytest.raises(DifferencesFormatError, match="has the columns"):
        load_differences(tmp_path)
    frame = load_differences(write_differences(tmp_path, DIFFERENCES))
    assert list(frame.columns) == DIFFERENCE_COLUMNS
    assert frame["value"].dtype == float and frame.loc[2, "policy"] == "run_a/iter_012"


def test_format_differences_prints_values_and_marks_intervals_that_exclude_zero(tmp_path: Path):
    text = format_differences(load_differences(write_differences(tmp_path, DIFFERENCES)))
    lines = text.splitlines()
    assert re.search(r"^iter_012 - best_of_k\s+reward\s+\+0\.123 \[\+0\.050, \+0\.200\] \*$", text, re.MULTILINE)
    assert re.search(r"^iter_001 - base\s+reward\s+\+0\.010 \[-0\.020, \+0\.040\]$", text, re.MULTILINE)
    assert "+1.500 [+1.200, +1.800] *" in text
    assert lines[2].index("reward") == lines[3].index("reward")  # fixed-width columns
    assert lines[-1].startswith("* ")


def test_monotonic_runs_counts_runs_that_rose_at_every_step(tmp_path: Path):
    rows = []
    values = {"run_a": [0.1, 0.2, 0.3], "run_b": [0.1, 0.3, 0.2], "run_c": [0.0, 0.05, 0.5], "all": [0.0, 0.1, 0.0]}
    for run, series in values.items():
        for policy, value in zip(["base", "iter_001", "iter_002"], series, strict=True):
            rows.append({"policy": policy, "run": run, "seed": "", "metric": "reward", "value": value})
        rows.append({"policy": "best_of_k", "run": run, "seed": "", "metric": "reward", "value": 9.0})
    frame = load_eval(write_eval(tmp_path, rows))
    assert monotonic_runs(frame) == (2, 3)
    assert monotonicity_line(frame) == "reward improved at every step in 2 of 3 runs"
    assert monotonic_runs(frame, "relevance") == (0, 0)


def test_index_shows_reward_kl_differences_and_monotonicity(tmp_path: Path):
    frame = kl_rows(tmp_path)
    assert len(frame)
    page = write_eval_report(tmp_path).read_text()
    assert 'id="figure-reward_kl"' in page and "improved at every step in 2 of 2 runs" in page
    assert "Paired differences" not in page  # no differences.csv: no section
    write_differences(tmp_path, DIFFERENCES)
    page = write_eval_report(tmp_path).read_text()
    assert "Paired differences" in page and "+0.123 [+0.050, +0.200]" in page
    assert "Policies not recognised" not in page
