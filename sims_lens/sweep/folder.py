"""The sweep folder: its grid, each cell's run folder and status, and the tidy results of all cells.

::

    SWEEP_DIR/grid.toml          the grid this folder belongs to (a changed grid is refused)
    SWEEP_DIR/status.json        every cell: status, error line, iterations, wall time, backend, task id
    SWEEP_DIR/results.csv        tidy: cell, one column per factor, iteration, split, metric, layer, value
    SWEEP_DIR/cells/NAME/        an ordinary run folder (everything that reads one reads a cell)
    SWEEP_DIR/logs/NAME.txt      the traceback of a failed cell
    SWEEP_DIR/eval/GROUP/        ``--eval``: sims-lens eval of the cells that differ only in seed
    SWEEP_DIR/index.html         the figures (analysis.sweep_report; the command line writes it)

Only the driving process writes here (workers write their own run folders), every file is replaced
whole (:func:`~sims_lens.files.write_atomic`), and ``results.csv`` is rebuilt from the cells' run
folders, so a sweep killed at any point and run again writes what an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sims_lens.files import write_atomic
from sims_lens.metrics import METRIC_COLUMNS
from sims_lens.run_folder import RunFolder
from sims_lens.sweep.grid import Grid, GridError, load_grid


class SweepError(ValueError):
    """A sweep cannot run as asked (an option out of range, a backend missing, a folder that is not a
    sweep's); the message says the fix."""


@dataclass
class CellStatus:
    """Where one cell stands. ``final``: a failure that running again would repeat (a bad value, the
    guard rail's stop, an oracle that cannot separate); other failures are retried by the next run."""

    name: str
    factors: dict[str, Any]
    status: str = "pending"
    error: str | None = None
    final: bool = False
    iterations: int = 0
    of: int = 0
    wall_s: float | None = None
    backend: str | None = None
    task_id: str | None = None
    threads: int | None = None


class SweepFolder:
    """A sweep's folder (see the module docstring for its files)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def grid_path(self) -> Path:
        return self.path / "grid.toml"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def results_path(self) -> Path:
        return self.path / "results.csv"

    @property
    def index_path(self) -> Path:
        return self.path / "index.html"

    def cell_dir(self, name: str) -> Path:
        return self.path / "cells" / name

    def log_path(self, name: str) -> Path:
        return self.path / "logs" / f"{name}.txt"

    def eval_dir(self, group: str) -> Path:
        return self.path / "eval" / group

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Refuse a second sweep driving this folder at once (``SWEEP_DIR/.lock``, as a run folder's)."""
        with RunFolder(self.path).lock():
            yield

    def claim(self, grid: Grid, extend: bool = False) -> None:
        """Make this folder ``grid``'s.

        A folder of another grid is refused with one line naming the difference, unless ``extend``
        and the new grid only adds cells (same imports, base and factors; every old cell kept).
        """
        if not self.grid_path.is_file():
            if self.path.is_dir() and any(not p.name.startswith(".") for p in self.path.iterdir()):
                raise SweepError(
                    f"{self.path} holds files but no grid.toml: it is not a sweep folder; choose a new --out"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.grid_path, grid.to_toml())
            return
        old = load_grid(self.grid_path)
        change = grid.change_from(old)
        if change is None:
            return
        names, old_names = [c.name for c in grid.cells()], [c.name for c in old.cells()]
        dropped = [n for n in old_names if n not in names]
        same_frame = grid.imports == old.imports and grid.base == old.base and list(grid.factors) == list(old.factors)
        adds = same_frame and not dropped and set(names) != set(old_names)
        if not (extend and adds):
            if extend:
                why = f"it would drop {dropped[0]}" if dropped else change
                raise GridError(f"--extend only adds cells to {self.path}, but {why}; use a new --out")
            fix = "pass --extend to add its new cells" if adds else "use a new --out"
            raise GridError(f"{self.path} belongs to another grid: {change}; {fix} (or restore {self.grid_path})")
        write_atomic(self.grid_path, grid.to_toml())

    def read_status(self) -> dict[str, CellStatus]:
        if not self.status_path.is_file():
            return {}
        try:
            data = json.loads(self.status_path.read_text())
            return {row["name"]: CellStatus(**row) for row in data["cells"]}
        except (ValueError, KeyError, TypeError) as err:
            raise SweepError(
                f"{self.status_path} is unreadable ({err}); delete it and run the sweep again (cells are kept)"
            ) from None

    def write_status(self, grid: Grid, statuses: dict[str, CellStatus]) -> None:
        rows = [asdict(statuses[cell.name]) for cell in grid.cells() if cell.name in statuses]
        write_atomic(self.status_path, json.dumps({"factors": list(grid.factors), "cells": rows}, indent=1) + "\n")

    def write_log(self, name: str, text: str) -> None:
        self.log_path(name).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.log_path(name), text)

    def completed(self, name: str) -> int:
        """The cell's finished iterations (0 when its run folder is missing or has not finished one)."""
        return RunFolder(self.cell_dir(name)).completed_iterations

    def collect_results(self, grid: Grid) -> pd.DataFrame:
        """Every cell's finished metric rows with the cell and its factor values in front; writes results.csv."""
        frames = []
        for cell in grid.cells():
            folder = RunFolder(self.cell_dir(cell.name))
            done = folder.completed_iterations  # first: a running cell may finish one while we read
            frame = folder.read_metrics()
            frame = frame[frame["iteration"] <= done]
            if frame.empty:
                continue
            front = {"cell": cell.name, **{k: _column_value(v) for k, v in cell.values.items()}}
            frames.append(pd.concat([pd.DataFrame([front] * len(frame)), frame.reset_index(drop=True)], axis=1))
        columns = ["cell", *grid.factors, *METRIC_COLUMNS]
        results = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        write_atomic(self.results_path, results[columns].to_csv(index=False))
        return results[columns]


def _column_value(value: Any) -> Any:
    """A factor value in a results column: scalars as they are, lists and tables as JSON text."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def last_iteration_table(results: pd.DataFrame, statuses: Sequence[CellStatus]) -> pd.DataFrame:
    """One row per cell: its status and the held-out metrics of its last finished iteration."""
    heldout = results[(results["split"] == "heldout") & results["layer"].isna()] if len(results) else results
    rows = []
    for status in statuses:
        mine = heldout[heldout["cell"] == status.name] if len(heldout) else heldout
        last = mine[mine["iteration"] == mine["iteration"].max()] if len(mine) else mine
        values = dict(zip(last["metric"], last["value"], strict=True)) if len(last) else {}
        rows.append(
            {
                "cell": status.name,
                "status": status.status,
                "iterations": f"{status.iterations}/{status.of}",
                "reward_mean": values.get("reward_mean"),
                "win_rate_vs_base": values.get("win_rate_vs_base"),
                "perplexity_under_base": values.get("perplexity_under_base"),
                "error": status.error or "",
            }
        )
    return pd.DataFrame(rows)
