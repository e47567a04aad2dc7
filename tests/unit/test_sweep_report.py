"""``analysis.sweep_report``: the page and figures of a sweep folder (synthetic results.csv and status.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest

from analysis.sweep_report import factor_figure, load_results, load_status, reward_metric, write_sweep_report

T975_DF1 = 12.706204736174698
"""Student t's 97.5% quantile with 1 degree of freedom (two seeds)."""
REWARDS = {
    ("pca", 0): [1.0, 1.5, 2.0, 2.5],
    ("pca", 1): [1.0, 1.7, 2.6, 2.9],
    ("mean_diff", 0): [1.0, 1.1, 1.2, 1.3],
    ("mean_diff", 1): [1.0, 1.3, 1.2, 1.6],
}
"""Held-out reward_mean per (learner, seed) at iterations 0..3."""
FAILED = "learner=probe,seed=0"
ERROR = "RuntimeError: the oracle exploded"


def _rows(cell: dict[str, object], rewards: list[float], relative: bool = False) -> list[dict[str, object]]:
    """One cell's metrics.csv rows with the cell columns in front, plus rows the figures must ignore."""
    name = ",".join(f"{k}={v}" for k, v in cell.items())
    front = {"cell": name, **cell}
    rows = []
    for t, reward in enumerate(rewards):
        metrics = {"perplexity_under_base": 5.0 + reward, "response_length": 40.0}
        if not relative:
            metrics["reward_mean"] = reward
        if t >= 1:
            metrics["win_rate_vs_base"] = reward / 4
        for metric, value in metrics.items():
            rows.append({**front, "iteration": t, "split": "heldout", "metric": metric, "layer": None, "value": value})
        rows.append({**front, "iteration": t, "split": "train", "metric": "reward_mean", "layer": None, "value": 99.0})
        rows.append({**front, "iteration": t, "split": "heldout", "metric": "reward_mean", "layer": 3, "value": 99.0})
    return rows


def _status(cells: list[dict[str, object]], factors: list[str], failed: bool = True) -> dict[str, object]:
    rows = [
        {
            "name": ",".join(f"{k}={v}" for k, v in cell.items()),
            "factors": cell,
            "status": "done",
            "error": None,
            "iterations": 3,
            "of": 3,
            "wall_s": 12.34,
            "backend": "local",
            "task_id": None,
            "threads": 1,
        }
        for cell in cells
    ]
    if failed:
        rows.append({**rows[0], "name": FAILED, "factors": {"learner": "probe", "seed": 0}, "status": "failed"})
        rows[-1].update(error=ERROR, iterations=0, wall_s=None)
    return {"factors": factors, "cells": rows}


def _sweep(folder: Path, relative: bool = False, with_results: bool = True) -> Path:
    """The 2x2 learner x seed sweep of :data:`REWARDS` (3 iterations) and one failed cell with no rows."""
    folder.mkdir(parents=True)
    cells = [{"learner": learner, "seed": seed} for learner, seed in REWARDS]
    rows = [r for cell in cells for r in _rows(cell, REWARDS[(cell["learner"], cell["seed"])], relative)]
    if with_results:
        pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    (folder / "status.json").write_text(json.dumps(_status(cells, ["learner", "seed"])))
    return folder


def _lines(fig: go.Figure, axis: str = "x") -> dict[str, go.Scatter]:
    return {t.name: t for t in fig.data if t.mode == "lines+markers" and t.xaxis == axis}


def _bands(fig: go.Figure) -> dict[str, go.Scatter]:
    return {t.legendgroup: t for t in fig.data if t.fill == "toself"}


def test_page_names_every_cell_and_the_failed_cells_error(tmp_path: Path) -> None:
    path = write_sweep_report(_sweep(tmp_path / "sweep"))
    assert path == tmp_path / "sweep" / "index.html"
    page = path.read_text()
    for learner, seed in REWARDS:
        assert f"learner={learner},seed={seed}" in page
    assert FAILED in page and ERROR in page
    assert "4 done, 1 failed" in page and "12.3" in page and "0/3" in page
    assert "Held-out reward_mean by learner" in page and "Held-out perplexity_under_base by learner" in page
    assert "<h2>By learner</h2>" in page and "By seed" not in page  # seeds are pooled, not drawn
    assert (tmp_path / "sweep" / "plotly.min.js").is_file()


def test_one_line_per_learner_and_the_interval_over_seeds(tmp_path: Path) -> None:
    folder = _sweep(tmp_path / "sweep")
    results, status = load_results(folder), load_status(folder)
    fig = factor_figure(results, status["factors"], "learner", reward_metric(results))
    lines = _lines(fig)
    assert list(lines) == ["learner=pca", "learner=mean_diff"]  # grid order, the failed cell has no line
    assert len(fig.data) == 4  # a line and a band per learner, one facet
    pca = lines["learner=pca"]
    assert list(pca.x) == [0, 1, 2, 3]
    assert pca.y[2] == pytest.approx((2.0 + 2.6) / 2)  # train and per-layer rows (99) left out
    band = _bands(fig)["learner=pca"]
    half = T975_DF1 * 0.6 / 2  # t * sd / sqrt(2), sd = |2.6 - 2.0| / sqrt(2)
    assert list(band.x) == [0, 1, 2, 3, 3, 2, 1, 0]
    assert band.y[2] == pytest.approx(2.3 + half) and band.y[5] == pytest.approx(2.3 - half)
    assert band.y[0] == pytest.approx(1.0) and band.y[7] == pytest.approx(1.0)  # both seeds equal at base
    perplexity = _lines(factor_figure(results, status["factors"], "learner", "perplexity_under_base"))
    assert perplexity["learner=mean_diff"].y[3] == pytest.approx(5.0 + (1.3 + 1.6) / 2)


def test_relative_oracle_falls_back_to_the_win_rate(tmp_path: Path) -> None:
    folder = _sweep(tmp_path / "sweep", relative=True)
    results = load_results(folder)
    assert reward_metric(results) == "win_rate_vs_base"
    line = _lines(factor_figure(results, ["learner", "seed"], "learner", "win_rate_vs_base"))["learner=pca"]
    assert list(line.x) == [1, 2, 3] and line.y[0] == pytest.approx((1.5 + 1.7) / 2 / 4)
    page = write_sweep_report(folder).read_text()
    assert "Held-out win_rate_vs_base by learner" in page and "Held-out reward_mean" not in page


def test_missing_results_still_writes_the_status_table(tmp_path: Path) -> None:
    folder = _sweep(tmp_path / "sweep", with_results=False)
    assert reward_metric(pd.DataFrame(columns=["cell", "iteration", "split", "metric", "layer", "value"])) == (
        "reward_mean"
    )
    with pytest.raises(FileNotFoundError, match=r"results\.csv does not exist"):
        load_results(folder)
    page = write_sweep_report(folder).read_text()
    assert FAILED in page and ERROR in page and "learner=pca,seed=1" in page
    assert "no held-out reward_mean rows yet" in page
    (folder / "results.csv").write_text("")  # an empty file is no rows, not an error
    assert load_results(folder).empty
    assert "no held-out perplexity_under_base rows yet" in write_sweep_report(folder).read_text()


def test_malformed_files_raise_naming_the_file(tmp_path: Path) -> None:
    folder = _sweep(tmp_path / "sweep")
    (folder / "status.json").write_text('{"factors": ["learner"], "cells": [')
    with pytest.raises(ValueError, match=r"status\.json is not JSON"):
        write_sweep_report(folder)
    (folder / "status.json").write_text(json.dumps({"factors": ["learner"], "cells": [{"name": "a"}]}))
    with pytest.raises(ValueError, match=r"status\.json: cell 0 lacks a name or a status"):
        load_status(folder)
    (folder / "status.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"status\.json does not exist"):
        load_status(folder)
    (folder / "results.csv").write_text("cell,learner,iteration,split,metric,layer,value\na,pca,0,heldout,m,,oops\n")
    with pytest.raises(ValueError, match=r"results\.csv line 2: value = 'oops' is not a number"):
        load_results(folder)


def test_identical_sweeps_give_identical_pages(tmp_path: Path) -> None:
    first = write_sweep_report(_sweep(tmp_path / "a" / "sweep")).read_bytes()
    second = write_sweep_report(_sweep(tmp_path / "b" / "sweep")).read_bytes()
    assert first == second
    assert str(tmp_path).encode() not in first


def _grid(other: str, values: list[str], seeded: bool = True) -> pd.DataFrame:
    """Results of learner x ``other`` (x seed 0, 1), reward = learner index + value index + seed / 10 + t."""
    rows = []
    for li, learner in enumerate(["pca", "hpr"]):
        for vi, value in enumerate(values):
            for seed in (0, 1) if seeded else (0,):
                rewards = [li + vi + seed / 10 + t for t in range(3)]
                cell = {"learner": learner, other: value, "seed": seed}
                rows += _rows(cell if seeded else {"learner": learner, other: value}, rewards)
    frame = pd.DataFrame(rows)
    for column in ["learner", other, "seed"]:
        if column in frame:
            frame[column] = frame[column].astype(str)  # as load_results reads them
    return frame


def test_other_factors_become_facets(tmp_path: Path) -> None:
    results = _grid("layers", ["[3, 15]", "[5]"])
    fig = factor_figure(results, ["learner", "layers", "seed"], "learner", "reward_mean")
    assert [a.text for a in fig.layout.annotations] == ["layers=[3, 15]", "layers=[5]"]
    for axis, offset in (("x", 0.0), ("x2", 1.0)):
        lines = _lines(fig, axis)
        assert list(lines) == ["learner=pca", "learner=hpr"]
        assert lines["learner=hpr"].y[1] == pytest.approx(1 + offset + 0.05 + 1)  # mean of seeds 0 and 1
    assert sum(t.showlegend is not False for t in fig.data) == 2  # one legend entry per learner


def test_many_combinations_are_pooled_and_no_seed_means_no_band(tmp_path: Path) -> None:
    values = [str(v) for v in range(7)]
    pooled = factor_figure(_grid("epochs", values), ["learner", "epochs", "seed"], "learner", "reward_mean")
    assert "pooled over 7 combinations of epochs" in pooled.layout.title.text
    assert pooled.layout.annotations == ()
    assert _lines(pooled)["learner=pca"].y[0] == pytest.approx(sum(range(7)) / 7 + 0.05)
    unseeded = factor_figure(_grid("epochs", ["1"], seeded=False), ["learner", "epochs"], "learner", "reward_mean")
    assert len(_lines(unseeded)) == 2 and not _bands(unseeded)
    with pytest.raises(ValueError, match="'oracle' is not a factor"):
        factor_figure(_grid("epochs", ["1"]), ["learner", "epochs", "seed"], "oracle", "reward_mean")
