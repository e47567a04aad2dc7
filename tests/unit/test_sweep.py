"""``sims-lens sweep``: grids of whole runs on the tiny model, local and Ray, resumable, failures isolated."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from sims_lens.cli import main
from sims_lens.run_folder import RunFolder
from sims_lens.sweep import Grid, GridError, SweepError, evaluate_groups, load_grid, sweep
from sims_lens.sweep.grid import Cell

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny random-weight model as a local Hugging Face folder: every process loads it by path."""
    from sims_lens.tiny import tiny_hf_model

    folder = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = tiny_hf_model(n_layers=2, d_model=64, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def grid_table(model: Path, **factors) -> dict:
    """The tiny model's grid: the tiny loop's settings as the base (less any key that is a factor)."""
    base = {
        "imports": ["tests.sweep_parts"],
        "model": str(model),
        "oracle": "letter_e",
        "iterations": 2,
        "prompts_per_iteration": 4,
        "samples_per_prompt": 3,
        "max_new_tokens": 6,
        "layers": [0, 1],
        "margin": 0.0,
        "eval_samples_per_prompt": 1,
        "heldout_size": 2,
        "validation_size": 2,
        "batch_size": 8,
        "top_p": 1.0,
    }
    factors = factors or {"learner": ["mean_diff", "pca"], "seed": [0, 1]}
    return {**{k: v for k, v in base.items() if k not in factors}, "factors": factors}


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of the cells' run folders and results.csv, by relative path (status.json holds wall times)."""
    paths = [*sorted((folder / "cells").rglob("*")), folder / "results.csv"]
    return {str(p.relative_to(folder)): p.read_bytes() for p in paths if p.is_file() and p.name != ".lock"}


# -- the grid ------------------------------------------------------------------------------------


def test_cells_cross_the_factors_with_stable_names_minus_exclusions():
    grid = Grid.from_dict(
        {
            "iterations": 2,
            "factors": {"learner": ["mean_diff", "pca"], "layers": [[3, 15], "top:2"], "seed": [0, 1]},
            "exclude": [{"learner": "pca", "seed": [1]}],
        }
    )
    names = [cell.name for cell in grid.cells()]
    assert names == [
        "learner=mean_diff,layers=3+15,seed=0",
        "learner=mean_diff,layers=3+15,seed=1",
        "learner=mean_diff,layers=top-2,seed=0",
        "learner=mean_diff,layers=top-2,seed=1",
        "learner=pca,layers=3+15,seed=0",
        "learner=pca,layers=top-2,seed=0",
    ]
    assert grid.cells()[0].group == "learner=mean_diff,layers=3+15"
    assert grid.cells()[0].config(grid.base).layers == [3, 15]
    assert Grid.from_dict(grid.to_dict()).cells() == grid.cells()  # grid.toml reads back the same cells


def test_nested_keys_dotted_or_as_tables_set_the_learners_table():
    quoted = Grid.from_dict({"factors": {"learners.hpr.epochs": [5, 10]}})
    tables = Grid.from_dict({"factors": {"learners": {"hpr": {"epochs": [5, 10]}}}})
    assert quoted.factors == tables.factors == {"learners.hpr.epochs": [5, 10]}
    cell = quoted.cells()[1]
    assert cell.name == "learners.hpr.epochs=10"
    assert cell.config({"learner": "hpr"}).learners == {"hpr": {"epochs": 10}}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"iterations": 2}, "needs a [factors] table"),
        ({"factors": {"learnr": ["pca"]}}, "'learnr', which is not a configuration key"),
        ({"factors": {"learners.epochs": [1]}}, "written learners.NAME.KEY"),
        ({"factors": {"seed": []}}, "non-empty list"),
        ({"factors": {"seed": 3}}, "non-empty list"),
        ({"factors": {"seed": [0, 0]}}, "lists a value twice"),
        ({"seed": 1, "factors": {"seed": [0]}}, "both a base key and a factor"),
        ({"factors": {"seed": [0]}, "exclude": [{"learner": "pca"}]}, "'learner', which is not a factor"),
        ({"factors": {"seed": [0]}, "exclude": [{"seed": 5}]}, "is not one of the factor's values"),
        ({"factors": {"model": ["a/b", "a:b"]}}, "share the folder name 'model=a-b'"),
        ({"imports": "tests.sweep_parts", "factors": {"seed": [0]}}, "list of module names"),
        ({"factors": {"seed": [0, 1]}, "exclude": [{"seed": [0, 1]}]}, "leave no cell to run"),
        ({"factors": {f"learners.l{i}{'x' * 30}.k": [1] for i in range(6)}}, "too long for a folder"),
    ],
)
def test_malformed_grids_are_refused_with_the_key_and_the_fix(table, message):
    with pytest.raises(GridError, match=re.escape(message)):
        Grid.from_dict(table)


def test_grid_files_missing_or_not_toml_name_the_file(tmp_path):
    with pytest.raises(GridError, match="does not exist"):
        load_grid(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[factors\nseed = [0]")
    with pytest.raises(GridError, match=f"grid file {bad} is not valid TOML"):
        load_grid(bad)


# -- the local backend ---------------------------------------------------------------------------


def test_two_by_two_grid_writes_four_run_folders_and_tidy_results(tiny_folder, tmp_path):
    out = tmp_path / "sweep"
    lines: list[str] = []
    result = sweep(grid_table(tiny_folder), out, threads=1, report=lines.append)
    assert [s.status for s in result.statuses] == ["done"] * 4
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == ["learner=mean_diff,seed=0", "learner=mean_diff,seed=1", "learner=pca,seed=0", "learner=pca,seed=1"]
    for status in result.statuses:
        config = RunFolder(out / "cells" / status.name).read_config()
        assert (config.learner, config.seed) == (status.factors["learner"], status.factors["seed"])
        assert RunFolder(out / "cells" / status.name).completed_iterations == 2
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == ["cell", "learner", "seed", "iteration", "split", "metric", "layer", "value"]
    assert set(results["cell"]) == set(cells) and set(results["iteration"]) == {0, 1, 2}
    one = results[(results["cell"] == "learner=pca,seed=1") & (results["metric"] == "reward_mean")]
    metrics = RunFolder(out / "cells" / "learner=pca,seed=1").read_metrics()
    expected = metrics[metrics["metric"] == "reward_mean"]["value"].to_numpy()
    assert one["value"].to_numpy() == pytest.approx(expected)
    assert sum(line.startswith("[") for line in lines) == 4 and "ETA" in lines[-1]
    table = result.table()
    assert list(table["iterations"]) == ["2/2"] * 4 and table["perplexity_under_base"].notna().all()

    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}
    again = sweep(grid_table(tiny_folder), out, threads=1, report=lines.append)
    assert "4 done, 0 failed (final), 0 to run" in lines[-1]  # nothing ran
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()} == before
    assert again.results.equals(result.results)


def test_worker_processes_compute_what_the_in_process_backend_does(tiny_folder, tmp_path):
    factors = {"learner": ["mean_diff", "pca"]}
    sweep(grid_table(tiny_folder, **factors), tmp_path / "one", threads=1, report=None)
    sweep(grid_table(tiny_folder, **factors), tmp_path / "two", max_parallel=2, threads=1, report=None)
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")


def test_a_worker_that_dies_loses_only_its_own_cell(tiny_folder, tmp_path):
    table = grid_table(tiny_folder, **{"seed": [0, 1], "oracles.letter_e.die": [True, False]})
    result = sweep(table, tmp_path / "sweep", max_parallel=2, threads=1, report=None)
    by_name = {s.name: s for s in result.statuses}
    for seed in (0, 1):  # each dying cell ran beside a healthy one, which finished
        dead, alive = (
            by_name[f"seed={seed},oracles.letter_e.die=true"],
            by_name[f"seed={seed},oracles.letter_e.die=false"],
        )
        assert (dead.status, dead.final) == ("failed", False)
        assert dead.error == "worker lost: its process was killed by SIGKILL (out of memory?)"
        assert (alive.status, alive.iterations) == ("done", 2)


def test_a_failing_cell_is_recorded_while_the_others_finish(tiny_folder, tmp_path):
    out = tmp_path / "sweep"
    flag = tmp_path / "crash"
    flag.write_text("")
    table = grid_table(tiny_folder, multiplier=[1.0, 0.0], **{"oracles.letter_e.fail_if": ["", str(flag)]})
    result = sweep(table, out, threads=1, report=None)
    by_name = {s.name: s for s in result.statuses}
    done = [s.name for s in result.statuses if s.status == "done"]
    assert done == ["multiplier=1.0,oracles.letter_e.fail_if=empty"]
    bad_value = by_name["multiplier=0.0,oracles.letter_e.fail_if=empty"]
    assert bad_value.final and "multiplier = 0.0 is not allowed" in bad_value.error
    crashed = [s for s in result.failed if not s.final]
    assert len(crashed) == 1 and "RuntimeError: simulated crash" in crashed[0].error
    assert "Traceback" in (out / "logs" / f"{crashed[0].name}.txt").read_text()
    saved = json.loads((out / "status.json").read_text())
    assert [c["status"] for c in saved["cells"]] == [s.status for s in result.statuses]

    flag.unlink()  # the crash is gone: the next run retries it, and not the final failures
    again = sweep(table, out, threads=1, report=None)
    statuses = {s.name: s.status for s in again.statuses}
    assert statuses[crashed[0].name] == "done"
    assert statuses["multiplier=0.0,oracles.letter_e.fail_if=empty"] == "failed"
    assert sum(s == "done" for s in statuses.values()) == 2


def test_a_bad_value_of_iterations_fails_its_cell_only(tiny_folder, tmp_path):
    result = sweep(grid_table(tiny_folder, iterations=["two", 1]), tmp_path / "sweep", threads=1, report=None)
    bad, good = result.statuses
    assert (bad.status, bad.final, bad.of) == ("failed", True, 0) and "iterations = 'two'" in bad.error
    assert (good.status, good.iterations, good.of) == ("done", 1, 1)


def test_a_guard_rail_stop_is_final_unless_retried_and_done_when_nothing_was_left(tiny_folder, tmp_path, monkeypatch):
    from sims_lens.loop import Guard, Sims
    from sims_lens.metrics import metric_row

    def reject(self, iteration, fitted, policy):  # the tiny model's text is equally unlikely steered or not
        message = f"iteration {iteration}'s policy raised validation perplexity (forced by the test)"
        kept = self.state.policy if self.state.policy is not None else fitted.scaled(0.0)
        return Guard(True, [metric_row(iteration, "guard", "rejected", 1.0)], kept, message)

    monkeypatch.setattr(Sims, "guard", reject)  # the in-process backend runs cells in this process
    table = {**grid_table(tiny_folder, iterations=[1, 2]), "on_rejected": "stop"}
    result = sweep(table, tmp_path / "sweep", threads=1, report=None)
    last, early = result.statuses
    assert (last.status, last.iterations, last.error) == ("done", 1, None)  # its only iteration was rejected
    assert (early.status, early.final, early.iterations) == ("failed", True, 1)
    assert early.error.startswith("PolicyRejectedError: iteration 1's policy raised validation perplexity")
    lines: list[str] = []
    sweep(table, tmp_path / "sweep", threads=1, report=lines.append)
    assert "1 done, 1 failed (final), 0 to run" in lines[0]
    sweep(table, tmp_path / "sweep", threads=1, retry_failed=True, report=lines.append)
    assert "0 failed (final), 1 to run" in lines[-2]


def test_a_grid_from_python_with_tuples_is_the_grid_its_toml_reads_back():
    table = {"factors": {"layers": [(0, 1), (1,)]}, "learners": {"hpr": {"epochs": 2}}}
    grid = Grid.from_dict(table)
    assert grid.factors == {"layers": [[0, 1], [1]]}
    assert Grid.from_dict(tomllib.loads(grid.to_toml())).change_from(grid) is None


def test_a_changed_grid_is_refused_and_extend_only_adds_cells(tiny_folder, tmp_path):
    out = tmp_path / "sweep"
    sweep(grid_table(tiny_folder, seed=[0]), out, threads=1, report=None)
    with pytest.raises(GridError, match=r"factor seed changed: \[0\] -> \[0, 1\]; pass --extend"):
        sweep(grid_table(tiny_folder, seed=[0, 1]), out, threads=1, report=None)
    changed_base = {**grid_table(tiny_folder, seed=[0]), "iterations": 3}
    with pytest.raises(GridError, match="the base key iterations changed: 2 -> 3; use a new --out"):
        sweep(changed_base, out, threads=1, report=None)
    with pytest.raises(GridError, match="--extend only adds cells"):
        sweep(grid_table(tiny_folder, seed=[1]), out, threads=1, extend=True, report=None)
    sweep(grid_table(tiny_folder, seed=[0, 1]), tmp_path / "two", threads=1, report=None)
    with pytest.raises(GridError, match=r"factor seed changed: \[0, 1\] -> \[1, 0\]; use a new --out"):
        sweep(grid_table(tiny_folder, seed=[1, 0]), tmp_path / "two", threads=1, report=None)
    lines: list[str] = []
    result = sweep(grid_table(tiny_folder, seed=[0, 1]), out, threads=1, extend=True, report=lines.append)
    assert "1 done, 0 failed (final), 1 to run" in lines[0]
    assert [s.status for s in result.statuses] == ["done", "done"]
    assert load_grid(out / "grid.toml").factors == {"seed": [0, 1]}


def test_sweep_options_out_of_range_fail_before_anything_is_written(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    for kwargs, message in [
        ({"backend": "slurm"}, "--backend 'slurm' is not allowed"),
        ({"max_parallel": 0}, "--max-parallel 0 is not allowed"),
        ({"threads": 0}, "--threads 0 is not allowed"),
        ({"gpus_per_cell": -1}, "--gpus-per-cell -1 is not allowed; use a number >= 0"),
        ({"gpus_per_cell": 1}, "are Ray options; add --backend ray"),
    ]:
        with pytest.raises(SweepError, match=message):
            sweep(grid_table(tiny_folder), out, report=None, **kwargs)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SweepError, match="is a file; pass a folder"):
        sweep(grid_table(tiny_folder), tmp_path / "a_file", report=None)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(SweepError, match=r"needs Ray, which is not installed: pip install 'sims-lens\[ray\]'"):
        sweep(grid_table(tiny_folder), out, backend="ray", report=None)
    with pytest.raises(SweepError, match="cannot import 'no_such_module'"):
        sweep({**grid_table(tiny_folder), "imports": ["no_such_module"]}, out, report=None)
    assert not out.exists()


def test_cli_exit_status_says_some_cells_failed(tiny_folder, tmp_path, capsys):
    import tomli_w

    path = tmp_path / "grid.toml"
    path.write_text(tomli_w.dumps(grid_table(tiny_folder, multiplier=[1.0, 0.0])))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--threads", "1"]) == 1
    captured = capsys.readouterr()
    assert "multiplier=1.0" in captured.out and "1 of 2 cells failed" in captured.err
    assert "multiplier=0.0: ConfigError: multiplier = 0.0 is not allowed" in captured.err
    path.write_text(tomli_w.dumps(grid_table(tiny_folder, multiplier=[1.0])))
    assert main(["sweep", str(path), "--out", str(out)]) == 2
    assert "belongs to another grid: factor multiplier changed" in capsys.readouterr().err


# -- interrupted -----------------------------------------------------------------------------------


def test_a_sweep_killed_mid_cell_resumes_to_the_same_files(tiny_folder, tmp_path):
    """SIGKILL of the sweep (and so of its workers) while its cells run; the same command again finishes them."""
    import tomli_w

    table = grid_table(tiny_folder, seed=[0, 1])
    table.update(iterations=3, oracles={"letter_e": {"delay": 0.25}})
    path = tmp_path / "grid.toml"
    path.write_text(tomli_w.dumps(table))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    command = [sys.executable, "-m", "sims_lens.cli", "sweep", str(path), "--threads", "1", "--max-parallel", "2"]
    command.append("--out")  # worker processes: they must die with the sweep, or the re-run finds their locks
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([*command, str(killed)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    first = RunFolder(killed / "cells" / "seed=0")
    deadline = time.monotonic() + 240
    while not (first.state_path.is_file() and first.completed_iterations >= 1):
        assert process.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.completed_iterations < 3  # killed mid-cell
    subprocess.run([*command, str(killed)], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    sweep(path, whole, threads=1, report=None)
    assert files_of(killed) == files_of(whole)


# -- Ray -------------------------------------------------------------------------------------------


def test_ray_runs_each_cell_as_a_task_with_the_local_backends_results(tiny_folder, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.chdir(ROOT)  # Ray workers import tests.sweep_parts from the driver's folder
    table = grid_table(tiny_folder, learner=["mean_diff", "pca"])
    sweep(table, tmp_path / "local", threads=1, report=None)
    result = sweep(table, tmp_path / "ray", backend="ray", cpus_per_cell=1, report=None)
    assert [s.backend for s in result.statuses] == ["ray", "ray"]
    task_ids = [s.task_id for s in result.statuses]
    assert all(task_ids) and len(set(task_ids)) == 2
    assert [s.threads for s in result.statuses] == [1, 1]
    assert files_of(tmp_path / "ray") == files_of(tmp_path / "local")


# -- eval per seed group ----------------------------------------------------------------------------


def test_evaluate_groups_runs_eval_once_per_group_of_seeds(tiny_folder, tmp_path):
    from sims_lens.eval_runs import EvalSettings

    table = grid_table(tiny_folder, learner=["mean_diff"], seed=[0, 1])
    result = sweep(table, tmp_path / "sweep", threads=1, report=None)
    lines: list[str] = []
    folders = evaluate_groups(result, EvalSettings(samples=1), report=lines.append)
    assert folders == [tmp_path / "sweep" / "eval" / "learner=mean_diff"]
    frame = pd.read_csv(folders[0] / "eval.csv")
    assert set(frame["run"]) == {"all", "learner=mean_diff,seed=0", "learner=mean_diff,seed=1"}
    evaluate_groups(result, EvalSettings(samples=1), report=lines.append)
    assert "kept" in lines[-1]


def test_cell_group_leaves_out_only_the_seed():
    assert Cell("a", {"learner": "pca", "seed": 0}).group == "learner=pca"
    assert Cell("b", {"seed": 3}).group == "all"
