"""Analysis while the loop runs: a callback that records geometry and rewrites the figures.

After every finished iteration, :class:`LiveAnalysis` appends the per-layer geometry and
separability metrics to the run folder's analysis metrics (tidy, split ``analysis``) and rewrites
its figures and ``index.html``. It never stops a run: any failure is reported as one warning line
on stderr and the loop goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.figures import write_index
from analysis.geometry import geometry_rows
from analysis.run_data import load_run
from sims_lens.metrics import tidy_metrics
from sims_lens.run_folder import RunFolder
from sims_lens.steering.functions import SteeringSet


class LiveAnalysis:
    """Loop callback: ``on_iteration`` records the analysis metrics and rewrites the figures."""

    def __init__(self, run_dir: str | Path, figures: bool = True) -> None:
        self.folder = RunFolder(run_dir)
        self.figures = figures
        self.seen: dict[str, dict[int, SteeringSet]] = {"policy": {}, "fit": {}}
        self.loop_metrics: dict[int, list[dict[str, Any]]] = {}

    def on_phase(self, iteration: int, phase: str, payload: dict[str, Any]) -> None:
        return None

    def on_iteration(self, result: Any) -> None:
        t = int(result.iteration)
        self.seen["policy"][t], self.seen["fit"][t] = result.policy, result.fitted
        self.loop_metrics[t] = list(result.metrics)
        try:
            self.record(result)
        except Exception as err:
            _warn(f"could not record the analysis metrics of iteration {t}", err)
        if not self.figures:
            return
        try:
            self.write_figures()
        except Exception as err:
            _warn(f"could not write the figures after iteration {t}", err)

    def rows(self, result: Any) -> list[dict[str, Any]]:
        """The analysis rows of one iteration: geometry (norm, cosines) and separability per layer."""
        t = int(result.iteration)
        rows = geometry_rows(
            t,
            result.policy,
            previous=self._steering(t - 1, "policy"),
            first=result.policy if t == 1 else self._steering(1, "policy"),
            fit=result.fitted,
            previous_fit=self._steering(t - 1, "fit"),
        )
        # the loop already measured separability per layer (same function, inputs, prompt groups and seed):
        # reuse its rows
        for row in result.metrics:
            if row["split"] == "train" and row["metric"] in ("probe_accuracy", "probe_accuracy_null", "fisher_ratio"):
                rows.append({**row, "iteration": t, "split": "analysis"})
        return rows

    def record(self, result: Any) -> None:
        """Append this iteration's rows to the analysis metrics (replacing any earlier rows of it)."""
        t = int(result.iteration)
        existing = self.folder.read_analysis_metrics()
        existing = existing[existing["iteration"] < t]
        new = tidy_metrics(pd.DataFrame(self.rows(result)))
        frames = [f for f in (existing, new) if len(f)]
        self.folder.write_analysis_metrics(pd.concat(frames, ignore_index=True) if frames else new)

    def write_figures(self) -> Path:
        """Rewrite the figures from the folder, filling in what only this callback has seen."""
        data = load_run(self.folder.path, require=False)
        for which, known in (("policy", data.policies), ("fit", data.fits)):
            for t, steering in self.seen[which].items():
                known.setdefault(t, steering)
        data.policies = dict(sorted(data.policies.items()))
        data.fits = dict(sorted(data.fits.items()))
        seen = set(data.metrics["iteration"])
        missing = [row for t, rows in sorted(self.loop_metrics.items()) if t not in seen for row in rows]
        if missing:
            frames = [f for f in (data.metrics, tidy_metrics(pd.DataFrame(missing))) if len(f)]
            data.metrics = pd.concat(frames, ignore_index=True)
        return write_index(self.folder.path, data)

    def _steering(self, iteration: int, which: str) -> SteeringSet | None:
        """A steering set seen in this session, else read from the run folder (resumed runs)."""
        if iteration < 1:
            return None
        seen = self.seen[which]
        if iteration not in seen:
            steering = self.folder.load_steering(iteration, which)
            if steering is None:
                return None
            seen[iteration] = steering
        return seen[iteration]


def live_callbacks(run_dir: str | Path) -> list[LiveAnalysis]:
    """The analysis callbacks the CLI adds to a run writing into ``run_dir``."""
    return [LiveAnalysis(run_dir)]


def _warn(what: str, err: BaseException) -> None:
    message = (str(err).strip().splitlines() or [""])[0]
    print(f"warning: analysis {what}: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
