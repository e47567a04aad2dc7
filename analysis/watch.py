"""Watch a run in progress from a notebook: the latest metrics and figures of the finished iterations.

    snap = refresh("runs/demo")            # reads only: safe while `sims-lens run` writes the folder
    snap.completed, snap.heldout           # iterations done, held-out metrics per iteration
    snap.figures["separability_layers"]    # any figure of analysis.figures.FIGURES

:func:`refresh` reads the run folder as it is now (only finished iterations: ``state.json`` is
written last) and builds the figures in memory; nothing is written. :func:`watch` redraws a
notebook cell every time another iteration finishes, until the run stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from analysis.figures import build_figures
from analysis.logit_lens import read_lens
from analysis.observed import ObservedSummary, load_summaries
from analysis.run_data import load_run, summary_from_metrics
from sims_lens.run_folder import RunFolder

WATCH_FIGURES = ("heldout", "separability_layers", "candidate_drift")
"""What :func:`watch` draws by default."""


@dataclass
class Snapshot:
    """A run folder's finished iterations at one moment."""

    run_dir: Path
    completed: int
    total: int | None
    """The configured number of iterations (None without a ``config.toml``)."""
    running: bool
    """Whether a live process holds the run's lock (is still writing it)."""
    heldout: pd.DataFrame
    """Held-out metrics, one row per iteration (0 = the base model)."""
    analysis: pd.DataFrame
    """The live analysis rows (split ``analysis``), tidy."""
    lens: pd.DataFrame
    """The logit-lens table (``RUN/logit_lens.csv``; empty where the run had no model for it)."""
    figures: dict[str, go.Figure] = field(default_factory=dict)
    observed: dict[int, ObservedSummary] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """Every configured iteration finished, or nothing is writing the run any more."""
        return not self.running or (self.total is not None and self.completed >= self.total)


def refresh(
    run_dir: str | Path, names: Sequence[str] | None = None, previous: Snapshot | None = None, tries: int = 3
) -> Snapshot:
    """The latest :class:`Snapshot` of ``run_dir`` (figures ``names``, default all).

    ``previous``: an earlier snapshot whose observed-layer summaries are reused rather than read
    again. A file caught in the middle of a write is read again (up to ``tries`` times).
    """
    for attempt in range(tries):
        try:
            return _snapshot(Path(run_dir), names, previous)
        except (ValueError, OSError, KeyError):
            if attempt == tries - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _snapshot(run_dir: Path, names: Sequence[str] | None, previous: Snapshot | None) -> Snapshot:
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise ValueError(f"run folder {folder.path} does not exist")
    data = load_run(run_dir, require=False)  # a run that has not evaluated anything yet is fine
    known = previous.observed if previous is not None and previous.run_dir == run_dir else None
    observed = load_summaries(run_dir, known)
    total = data.config.get("iterations")
    return Snapshot(
        run_dir=run_dir,
        completed=data.completed_iterations,
        total=int(total) if total is not None else None,
        running=folder.live_holder() is not None,
        heldout=summary_from_metrics(data.metrics),
        analysis=data.analysis,
        lens=read_lens(run_dir),
        figures=build_figures(data, observed, names=names),
        observed=observed,
    )


def watch(
    run_dir: str | Path,
    names: Sequence[str] = WATCH_FIGURES,
    interval: float = 30.0,
    timeout: float | None = None,
) -> Snapshot:
    """In a notebook: show the held-out table and figures ``names``, redrawn whenever another iteration
    finishes; returns the last snapshot once the run is done or stops, or after ``timeout`` seconds."""
    clear_output, display = _display_tools()
    start = time.monotonic()
    shown, snap = -1, None
    while True:
        snap = refresh(run_dir, names, previous=snap)
        if snap.completed != shown:
            shown = snap.completed
            clear_output(wait=True)
            state = "running" if snap.running else "not running"
            print(f"{snap.run_dir}: {snap.completed} of {snap.total or '?'} iterations finished ({state})")
            display(snap.heldout)
            for name in names:
                if name in snap.figures:
                    display(snap.figures[name])
        if snap.done or (timeout is not None and time.monotonic() - start >= timeout):
            return snap
        time.sleep(interval)


def _display_tools() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """IPython's ``clear_output`` and ``display``; outside IPython, nothing and ``print``."""
    try:
        from IPython.display import clear_output, display
    except ImportError:
        return (lambda wait=False: None), print
    return clear_output, display
