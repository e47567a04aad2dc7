"""One cell of a sweep: an ordinary SIMS run into its run folder, in whatever process a backend gives it.

:func:`run_cell` never raises for a cell's own failure (a bad value, the guard rail's stop, out of
memory): it returns an outcome with the error line, so one cell cannot stop the others. It sets
torch's thread count first, the same way in every backend, so a cell computes the same numbers
wherever it runs. A cell whose run folder holds finished iterations resumes after the last one.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from sims_lens.validation import ConfigError

_LOADED: dict[tuple[str, str, str], tuple[Any, Any]] = {}
"""The model this process loaded last, by (model, dtype, device): consecutive cells share it."""


@dataclass(frozen=True)
class CellJob:
    """What a backend hands a worker: everything a cell needs, as plain picklable data."""

    name: str
    folder: str
    """The cell's run folder, an absolute path (workers may run elsewhere)."""
    settings: dict[str, Any]
    threads: int
    imports: tuple[str, ...] = ()
    """Modules to import first: where the grid's own oracles and learners register."""


@dataclass
class CellOutcome:
    """What a worker hands back. ``final``: running the cell again would fail the same way. Its finished
    iterations are not here: the driver reads them from the run folder (also for a worker that vanished)."""

    name: str
    status: str
    wall_s: float
    threads: int
    error: str | None = None
    final: bool = False
    log: str | None = None
    task_id: str | None = None


def run_cell(job: CellJob, parent: int | None = None) -> CellOutcome:
    """Run (or resume) one cell; ``parent``: the pid whose exit stops the cell at its next phase."""
    start, previous = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        return _run(job, parent, start)
    finally:
        torch.set_num_threads(previous)  # the in-process backend leaves the caller's threads as they were


def _run(job: CellJob, parent: int | None, start: float) -> CellOutcome:
    from sims_lens.config import config_from_dict
    from sims_lens.loop import NotSeparableError, PolicyRejectedError, Sims
    from sims_lens.run_folder import RunFolder

    folder = RunFolder(job.folder)

    def outcome(status: str, err: BaseException | None = None, final: bool = False) -> CellOutcome:
        line = None if err is None else error_line(err)
        log = None if err is None else "".join(traceback.format_exception(err))
        return CellOutcome(job.name, status, time.perf_counter() - start, job.threads, line, final, log)

    try:
        import_modules(job.imports)
        config = config_from_dict(job.settings)
        model, tokenizer = model_for(config)
        sims = Sims.from_config(
            config,
            model=model,
            tokenizer=tokenizer,
            progress=False,
            out=job.folder,
            resume=folder.has_config(),
            callbacks=[_ParentWatch(parent)] if parent is not None else [],
        )
        for _ in sims.iterate():
            pass
    except PolicyRejectedError as err:  # on_rejected = "stop": a result, not an accident
        if folder.completed_iterations >= config.iterations:
            return outcome("done")  # the last iteration was rejected: nothing was left to stop
        return outcome("failed", err, final=True)
    except (ConfigError, NotSeparableError) as err:
        return outcome("failed", err, final=True)
    except Exception as err:  # out of memory, a crash: recorded, retried by the next run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return outcome("failed", err)
    return outcome("done")


def import_modules(names: tuple[str, ...] | list[str]) -> None:
    """Import each module once; a missing one raises ImportError naming the fix."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(
                f"imports: cannot import {name!r} ({error_line(err)}); make it importable where cells run "
                "(pip install it, or add its folder to PYTHONPATH)"
            ) from None


def error_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def model_for(config: Any) -> tuple[Any, Any]:
    from sims_lens.models import load_model

    key = (config.model, config.dtype, config.device)
    if key not in _LOADED:
        _LOADED.clear()  # one model at a time: a grid over models must not hold them all
        _LOADED[key] = load_model(*key)
    return _LOADED[key]


class _ParentWatch:
    """Stops a worker's cell at its next phase once the sweep that started it is gone (it was killed)."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def on_phase(self, iteration: int, phase: str, payload: dict[str, Any]) -> None:
        if os.getppid() != self.parent:
            print(f"the sweep (pid {self.parent}) is gone; stopping this cell", file=sys.stderr)
            os._exit(1)
