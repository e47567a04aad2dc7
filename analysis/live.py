"""Analysis while the loop runs: a callback that records geometry and rewrites the figures.

After every finished iteration, :class:`LiveAnalysis` appends the per-layer geometry and
separability metrics to ``RUN/analysis_metrics.csv`` (tidy, split ``analysis``) and rewrites
``RUN/figures/*.html`` and ``index.html``. It never stops a run: any failure is reported as one
warning line on stderr and the loop goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.figures import write_index
from analysis.geometry import geometry_rows
from analysis.run_data import ANALYSIS_METRICS, load_run, read_metrics, tidy_metrics, write_metrics
from sims_lens.steering.functions import SteeringSet
from sims_lens.steering.io import load_steering


class LiveAnalysis:
    """Loop callback: ``on_iteration`` records the analysis metrics and rewrites the figures."""

    def __init__(self, run_dir: str | Path, figures: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.figures = figures
        self.policies: dict[int, SteeringSet] = {}
        self.updates: dict[int, SteeringSet] = {}
        self.loop_metrics: dict[int, list[dict[str, Any]]] = {}

    def on_phase(self, iteration: int, phase: str, payload: dict[str, Any]) -> None:
        return None

    def on_iteration(self, result: Any) -> None:
        t = int(result.iteration)
        self.policies[t], self.updates[t] = result.policy, result.update
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
            previous=self._steering(t - 1, "iter"),
            first=result.policy if t == 1 else self._steering(1, "iter"),
            update=result.update,
            previous_update=self._steering(t - 1, "update"),
        )
        # the loop already measured separability per layer (same function, inputs and seed): reuse its rows
        for row in result.metrics:
            if row["split"] == "train" and row["metric"] in ("probe_accuracy", "fisher_ratio"):
                rows.append({**row, "iteration": t, "split": "analysis"})
        return rows

    def record(self, result: Any) -> None:
        """Append this iteration's rows to ``analysis_metrics.csv`` (replacing any earlier rows of it)."""
        t = int(result.iteration)
        path = self.run_dir / ANALYSIS_METRICS
        existing = read_metrics(path)
        existing = existing[existing["iteration"] < t]
        new = tidy_metrics(pd.DataFrame(self.rows(result)))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        frames = [f for f in (existing, new) if len(f)]
        write_metrics(path, pd.concat(frames, ignore_index=True) if frames else new)

    def write_figures(self) -> Path:
        """Rewrite the figures from the folder, filling in what only this callback has seen."""
        data = load_run(self.run_dir, require=False)
        for t, policy in self.policies.items():
            data.policies.setdefault(t, policy)
        for t, update in self.updates.items():
            data.updates.setdefault(t, update)
        data.policies = dict(sorted(data.policies.items()))
        data.updates = dict(sorted(data.updates.items()))
        seen = set(data.metrics["iteration"])
        missing = [row for t, rows in sorted(self.loop_metrics.items()) if t not in seen for row in rows]
        if missing:
            frames = [f for f in (data.metrics, tidy_metrics(pd.DataFrame(missing))) if len(f)]
            data.metrics = pd.concat(frames, ignore_index=True)
        return write_index(self.run_dir, data)

    def _steering(self, iteration: int, kind: str) -> SteeringSet | None:
        """A steering set seen in this session, else read from the run folder (resumed runs)."""
        if iteration < 1:
            return None
        seen = self.policies if kind == "iter" else self.updates
        if iteration in seen:
            return seen[iteration]
        path = self.run_dir / "steering" / f"{kind}_{iteration:03d}.safetensors"
        if not path.is_file():
            return None
        steering = load_steering(path)
        seen[iteration] = steering
        return steering


def live_callbacks(run_dir: str | Path) -> list[LiveAnalysis]:
    """The analysis callbacks the CLI adds to a run writing into ``run_dir``."""
    return [LiveAnalysis(run_dir)]


def _warn(what: str, err: BaseException) -> None:
    message = (str(err).strip().splitlines() or [""])[0]
    print(f"warning: analysis {what}: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
