"""Rebuild a run's figures and summary from its folder alone (finished or partial run).

``report(run_dir)`` reads ``steering/iter_*.safetensors``, ``metrics.csv`` (and the live callback's
``analysis_metrics.csv`` where present; written from the steering files if the live callback never
ran), and rewrites ``RUN/figures/``. ``summary_table(run_dir)`` is the held-out metrics,
one row per iteration (0 = the base model).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.figures import write_index
from analysis.geometry import geometry_rows
from analysis.run_data import RunData, load_run, summary_from_metrics
from sims_lens.metrics import tidy_metrics
from sims_lens.run_folder import RunFolder


def summary_table(run_dir: str | Path) -> pd.DataFrame:
    """The held-out metrics of a run folder, one row per iteration (ValueError if there are none)."""
    data = load_run(run_dir)
    table = summary_from_metrics(data.metrics)
    if table.empty:
        raise ValueError(f"{run_dir}/metrics.csv has no held-out metrics yet (the run has not evaluated anything)")
    return table


def report(run_dir: str | Path) -> Path:
    """Rewrite ``RUN/figures/*.html`` and ``RUN/figures/index.html`` from the folder; returns the index path."""
    data = load_run(run_dir)
    if data.metrics.empty:
        raise ValueError(f"{run_dir}/metrics.csv holds no rows yet; nothing to report")
    if data.analysis.empty and data.policies:
        data.analysis = geometry_metrics(data)
        RunFolder(run_dir).write_analysis_metrics(data.analysis)
    return write_index(run_dir, data)


def geometry_metrics(data: RunData) -> pd.DataFrame:
    """The live callback's per-layer geometry rows, recomputed from the saved steering sets.

    Separability needs the iteration's activations, which a run folder does not keep: the loop's
    own ``probe_accuracy`` / ``fisher_ratio`` rows (split ``train``) stand in for it.
    """
    iterations = sorted(data.policies)
    rows = []
    for i, t in enumerate(iterations):
        previous = iterations[i - 1] if i else None
        rows += geometry_rows(
            t,
            data.policies[t],
            previous=data.policies[previous] if previous is not None else None,
            first=data.policies[iterations[0]],
            fit=data.fits.get(t),
            previous_fit=data.fits.get(previous) if previous is not None else None,
        )
    return tidy_metrics(pd.DataFrame(rows))
