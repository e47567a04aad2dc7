"""``sweep()``: every cell of a grid as a whole SIMS run, resumable, on the local machine or Ray.

Run the same sweep again and finished cells are skipped, interrupted ones resume after their last
finished iteration, and failed ones run again (unless their failure is final: a bad value, the
guard rail's stop). What a cell has done is read from its run folder, never from memory, so a
sweep killed at any point loses at most the iterations that were running.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sims_lens.config import SimsConfig
from sims_lens.sweep.backends import BACKENDS, import_ray, run_local, run_processes, run_ray
from sims_lens.sweep.cell import CellJob, CellOutcome, import_modules, model_for
from sims_lens.sweep.folder import CellStatus, SweepError, SweepFolder, last_iteration_table
from sims_lens.sweep.grid import Cell, Grid, load_grid

Report = Callable[[str], None]


@dataclass
class SweepResult:
    """A sweep's folder, its grid, where every cell stands, and the tidy results of all cells."""

    folder: SweepFolder
    grid: Grid
    statuses: list[CellStatus]
    results: pd.DataFrame = field(repr=False)

    @property
    def failed(self) -> list[CellStatus]:
        return [s for s in self.statuses if s.status == "failed"]

    def table(self) -> pd.DataFrame:
        """One row per cell: status and the held-out metrics of its last finished iteration."""
        return last_iteration_table(self.results, self.statuses)


def sweep(
    grid: Grid | Mapping[str, Any] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    backend: str = "local",
    max_parallel: int | None = None,
    address: str | None = None,
    cpus_per_cell: float | None = None,
    gpus_per_cell: float = 0,
    threads: int | None = None,
    extend: bool = False,
    retry_failed: bool = False,
    report: Report | None = print,
) -> SweepResult:
    """Run every cell of ``grid`` (a :class:`Grid`, its TOML-shaped table, or a GRID.toml path) into ``out``.

    Args:
        backend: ``local`` (this machine) or ``ray`` (each cell a Ray task; ``address`` names a
            cluster, default a local instance).
        max_parallel: cells at once: local worker processes (default 1: in this process, the model
            loaded once), or Ray tasks in flight (default: as many as the cluster fits).
        cpus_per_cell, gpus_per_cell: Ray resources per cell (default 1 CPU, no GPU).
        threads: torch threads per cell, set before each cell in every backend. Default: this
            process's torch threads in-process, the usable cores / ``max_parallel`` in worker
            processes, the cell's CPUs on Ray. The same value gives the same
            numbers in every backend; different values may differ in the last bits.
        extend: allow a grid that only adds cells to an existing sweep folder.
        retry_failed: run cells whose failure was final (a bad value, the guard rail's stop) again.
        report: called with one progress line per event (None: silent).
    """
    _check_options(backend, max_parallel, address, cpus_per_cell, gpus_per_cell, threads)
    if not isinstance(grid, Grid):
        grid = load_grid(grid) if isinstance(grid, str | os.PathLike) else Grid.from_dict(grid)
    try:
        import_modules(grid.imports)  # here first: a missing module stops the sweep before any cell
    except ImportError as err:
        raise SweepError(str(err)) from None
    say: Report = report or (lambda line: None)
    folder = SweepFolder(out)
    if folder.path.exists() and not folder.path.is_dir():
        raise SweepError(f"--out {folder.path} is a file; pass a folder for the sweep")
    with folder.lock():
        folder.claim(grid, extend)
        statuses = _current_statuses(folder, grid, retry_failed)
        todo = [c for c in grid.cells() if statuses[c.name].status == "pending"]
        folder.write_status(grid, statuses)
        parallel = max_parallel or (1 if backend == "local" else None)
        per_cell = threads or _default_threads(backend, parallel or 1, cpus_per_cell)
        done, final = (sum(st.status == s for st in statuses.values()) for s in ("done", "failed"))
        say(
            f"sweep {folder.path}: {len(statuses)} cells, {done} done, {final} failed (final), {len(todo)} to run "
            f"({backend}, {parallel or 'as many as Ray fits'} at once, {per_cell} thread(s) per cell)"
        )
        jobs = [
            CellJob(
                c.name, str(folder.cell_dir(c.name).resolve()), c.settings(grid.base), per_cell, tuple(grid.imports)
            )
            for c in todo
        ]
        progress = _Progress(folder, grid, statuses, backend, say)
        if backend == "ray":
            outcomes = run_ray(
                jobs,
                progress.started,
                address=address,
                max_parallel=parallel,
                cpus=cpus_per_cell or 1,
                gpus=gpus_per_cell,
            )
        elif parallel and parallel > 1:
            outcomes = run_processes(jobs, progress.started, parallel)
        else:
            outcomes = run_local(jobs, progress.started)
        try:
            with closing(outcomes):  # an error or Ctrl-C here stops the cells still running
                for outcome in outcomes:
                    progress.finished(outcome)
        finally:
            for status in statuses.values():
                if status.status == "running":  # interrupted: the next run resumes it
                    status.status = "pending"
                    status.iterations = folder.completed(status.name)
            folder.write_status(grid, statuses)
        results = folder.collect_results(grid)
    ordered = [statuses[c.name] for c in grid.cells()]
    return SweepResult(folder, grid, ordered, results)


def evaluate_groups(result: SweepResult, settings: Any, report: Report | None = print) -> list[Path]:
    """``sims-lens eval`` (:func:`~sims_lens.eval_runs.evaluate_runs`) per group of finished cells that
    differ only in seed, into ``SWEEP_DIR/eval/GROUP``. A group evaluated after its cells last changed
    is kept (delete ``eval/GROUP`` to evaluate it again, e.g. with other settings)."""
    from sims_lens.eval_runs import evaluate_runs
    from sims_lens.run_folder import RunFolder

    say: Report = report or (lambda line: None)
    groups: dict[str, list[Cell]] = {}
    for cell in result.grid.cells():
        groups.setdefault(cell.group, []).append(cell)
    written = []
    done = {s.name for s in result.statuses if s.status == "done"}
    for group, cells in groups.items():
        runs = [result.folder.cell_dir(c.name) for c in cells if c.name in done]
        if not runs:
            continue
        out = result.folder.eval_dir(group)
        newest = max((run / "state.json").stat().st_mtime for run in runs)
        if (out / "eval.csv").is_file() and (out / "eval.csv").stat().st_mtime >= newest:
            say(f"eval {group}: kept ({out}/eval.csv is newer than its {len(runs)} cell(s))")
            written.append(out)
            continue
        model, tokenizer = model_for(RunFolder(runs[0]).read_config())
        start = time.perf_counter()
        evaluate_runs(runs, out, model, tokenizer, settings)
        say(f"eval {group}: {len(runs)} run(s) in {time.perf_counter() - start:.0f} s -> {out}/eval.csv")
        written.append(out)
    return written


def _check_options(
    backend: str,
    max_parallel: int | None,
    address: str | None,
    cpus_per_cell: float | None,
    gpus_per_cell: float,
    threads: int | None,
) -> None:
    """Each option in range, named as on the command line; Ray importable when asked for."""
    if backend not in BACKENDS:
        raise SweepError(f"--backend {backend!r} is not allowed; use one of {', '.join(BACKENDS)}")
    for flag, value in (("--max-parallel", max_parallel), ("--threads", threads)):
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise SweepError(f"{flag} {value!r} is not allowed; use an integer >= 1")
    if cpus_per_cell is not None and not (isinstance(cpus_per_cell, int | float) and cpus_per_cell > 0):
        raise SweepError(f"--cpus-per-cell {cpus_per_cell!r} is not allowed; use a number > 0")
    if not (isinstance(gpus_per_cell, int | float) and gpus_per_cell >= 0):
        raise SweepError(f"--gpus-per-cell {gpus_per_cell!r} is not allowed; use a number >= 0")
    if backend == "ray":
        import_ray()  # before anything is written
    elif cpus_per_cell is not None or gpus_per_cell or address is not None:
        raise SweepError("--address, --cpus-per-cell and --gpus-per-cell are Ray options; add --backend ray")


def _current_statuses(folder: SweepFolder, grid: Grid, retry_failed: bool) -> dict[str, CellStatus]:
    """Every cell's status as its run folder and the last status file have it: done, failed (final) or pending."""
    saved = folder.read_status()
    statuses = {}
    for cell in grid.cells():
        status = saved.get(cell.name) or CellStatus(cell.name, dict(cell.values))
        planned = cell.settings(grid.base).get("iterations", SimsConfig.iterations)
        status.of = planned if isinstance(planned, int) else 0  # a bad value fails the cell, with its message
        status.iterations = folder.completed(cell.name)
        if status.of and status.iterations >= status.of:
            status.status, status.error, status.final = "done", None, False
        elif not (status.status == "failed" and status.final and not retry_failed):
            status.status = "pending"
        statuses[cell.name] = status
    return statuses


def _default_threads(backend: str, max_parallel: int, cpus_per_cell: float | None) -> int:
    if backend == "ray":
        return max(1, int(cpus_per_cell or 1))
    if max_parallel == 1:
        return torch.get_num_threads()  # what this process uses (OMP_NUM_THREADS, set_num_threads)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable // max_parallel)


class _Progress:
    """Keeps status.json and results.csv current and prints a line per cell (done, running, failed, ETA)."""

    def __init__(self, folder: SweepFolder, grid: Grid, statuses: dict[str, CellStatus], backend: str, say: Report):
        self.folder, self.grid, self.statuses, self.backend, self.say = folder, grid, statuses, backend, say
        self.walls: list[float] = []
        self.running_peak = 1
        """The most cells in flight so far: what the backend runs at once, for the ETA."""

    def started(self, name: str) -> None:
        status = self.statuses[name]
        status.status, status.backend, status.error, status.final = "running", self.backend, None, False
        self.folder.log_path(name).unlink(missing_ok=True)  # a log names this attempt's failure only
        self.running_peak = max(self.running_peak, sum(st.status == "running" for st in self.statuses.values()))
        self.folder.write_status(self.grid, self.statuses)

    def finished(self, outcome: CellOutcome) -> None:
        status = self.statuses[outcome.name]
        status.status, status.error, status.final = outcome.status, outcome.error, outcome.final
        status.iterations = self.folder.completed(outcome.name)  # also right for a worker that vanished
        status.wall_s, status.threads, status.task_id = round(outcome.wall_s, 1), outcome.threads, outcome.task_id
        if outcome.log:
            self.folder.write_log(outcome.name, outcome.log)
        self.folder.write_status(self.grid, self.statuses)
        self.folder.collect_results(self.grid)
        if outcome.wall_s > 0:
            self.walls.append(outcome.wall_s)
        self.say(self.line(status))

    def line(self, status: CellStatus) -> str:
        counts = {s: sum(st.status == s for st in self.statuses.values()) for s in ("done", "running", "failed")}
        left = sum(st.status in ("pending", "running") for st in self.statuses.values())
        eta = sum(self.walls) / len(self.walls) * left / self.running_peak if self.walls else 0.0
        what = f"{status.status:<6} {status.name}  {status.iterations}/{status.of} iterations  {status.wall_s:.0f} s"
        if status.error:
            what += f"  ({status.error})"
        return (
            f"[{counts['done'] + counts['failed']}/{len(self.statuses)}] {what} | {counts['running']} running, "
            f"{counts['failed']} failed, ETA {_minutes(eta)}"
        )


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
