"""Rebuild a run's figures and summary from its folder alone (finished or partial run).

``report(run_dir)`` reads ``steering/iter_*.safetensors``, ``metrics.csv``, the observed
activations of every iteration that kept them, and the live callback's ``analysis_metrics.csv``
and ``logit_lens.csv`` where present (the analysis rows are written from the folder if the live
callback never ran; the logit lens is read when a model is given), and rewrites ``RUN/figures/``.
``summary_table(run_dir)`` is the held-out metrics, one row per iteration (0 = the base model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.geometry import geometry_rows
from analysis.live import write_run_lens
from analysis.observed import SEPARABILITY_METRICS, ObservedSummary, load_summaries, run_observed_rows
from analysis.pages import write_index
from analysis.run_data import RunData, load_run, summary_from_metrics
from sims_lens.metrics import empty_metrics, tidy_metrics
from sims_lens.run_folder import RunFolder


def summary_table(run_dir: str | Path) -> pd.DataFrame:
    """The held-out metrics of a run folder, one row per iteration (ValueError if there are none)."""
    data = load_run(run_dir)
    table = summary_from_metrics(data.metrics)
    if table.empty:
        raise ValueError(f"{run_dir}/metrics.csv has no held-out metrics yet (the run has not evaluated anything)")
    return table


def report(run_dir: str | Path, model: Any = None, tokenizer: Any = None) -> Path:
    """Rewrite ``RUN/figures/*.html`` and ``RUN/figures/index.html`` from the folder; returns the index path.

    With ``model`` (and its ``tokenizer``), observed iterations without a logit-lens reading get one
    first (:func:`analysis.live.write_run_lens`).
    """
    data = load_run(run_dir)
    if data.metrics.empty:
        raise ValueError(f"{run_dir}/metrics.csv holds no rows yet; nothing to report")
    observed = load_summaries(run_dir)
    if data.analysis.empty and (data.policies or observed):
        data.analysis = analysis_metrics(data, observed)
        RunFolder(run_dir).write_analysis_metrics(data.analysis)
    lens = write_run_lens(run_dir, model, tokenizer, summaries=observed) if model is not None else None
    return write_index(run_dir, data, observed=observed, lens=lens)


def analysis_metrics(data: RunData, observed: dict[int, ObservedSummary] | None = None) -> pd.DataFrame:
    """The live callback's ``analysis`` rows, recomputed from the folder.

    Geometry of the steered layers from the saved steering sets (:func:`geometry_metrics`); for every
    iteration that kept its observed activations, the candidates and separability of every observed
    layer (:func:`analysis.observed.run_observed_rows`); for steered layers that were not observed
    (``observe = "none"``, a partial list, older runs) the loop's own ``probe_accuracy`` /
    ``probe_accuracy_null`` / ``fisher_ratio`` rows (split ``train``) stand in, as the live callback does.
    """
    rows = run_observed_rows(data.path, summaries=observed)
    covered = {(int(row["iteration"]), row["layer"]) for row in rows}
    metrics = data.metrics
    train = metrics[
        (metrics["split"] == "train") & metrics["metric"].isin(SEPARABILITY_METRICS) & metrics["layer"].notna()
    ]
    keep = [(int(t), int(layer)) not in covered for t, layer in zip(train["iteration"], train["layer"], strict=True)]
    train = train.loc[np.asarray(keep, dtype=bool)]
    frames = [geometry_metrics(data), tidy_metrics(pd.DataFrame(rows)), train.assign(split="analysis")]
    frames = [f for f in frames if len(f)]
    return tidy_metrics(pd.concat(frames, ignore_index=True)) if frames else empty_metrics()


def geometry_metrics(data: RunData) -> pd.DataFrame:
    """The live callback's per-layer geometry rows of the steered layers, recomputed from the saved steering sets."""
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
