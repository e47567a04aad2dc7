"""Analysis while the loop runs: a callback that records geometry and rewrites the figures.

After every finished iteration, :class:`LiveAnalysis` appends the per-layer metrics to the run
folder's analysis metrics (tidy, split ``analysis``): the steered layers' geometry
(:func:`analysis.geometry.geometry_rows`) and, for every *observed* layer, the candidate
direction's norm and cosines and the separability of H+ vs H- (:func:`analysis.observed.observed_rows`).
Given the model, it also reads each observed layer's candidate through the logit lens into
``RUN/logit_lens.csv``. Then it rewrites the figures and ``index.html``. It never stops a run:
any failure is reported as one warning line on stderr and the loop goes on.

A run whose loop observes no layers beyond the steered ones (older cores) still works: the
separability rows of the steered layers are then copied from the loop's own ``train`` rows.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.geometry import geometry_rows
from analysis.logit_lens import LENS_K, lens_rows, read_lens, replace_lens
from analysis.observed import (
    SEPARABILITY_METRICS,
    ObservedSummary,
    load_observed,
    load_summaries,
    observed_of,
    observed_rows,
    summarize,
)
from analysis.pages import write_index
from analysis.run_data import load_run
from sims_lens.activations import PairActivations
from sims_lens.metrics import tidy_metrics
from sims_lens.run_folder import RunFolder
from sims_lens.steering.functions import SteeringSet


class LiveAnalysis:
    """Loop callback: ``on_iteration`` records the analysis metrics (and the logit lens) and rewrites the figures.

    ``model`` / ``tokenizer``: the run's model (its final norm and unembedding), for the logit-lens
    reading of every observed layer's candidate after each iteration (none without a model).
    """

    def __init__(
        self,
        run_dir: str | Path,
        figures: bool = True,
        model: Any = None,
        tokenizer: Any = None,
        lens_k: int = LENS_K,
    ) -> None:
        self.folder = RunFolder(run_dir)
        self.figures = figures
        self.model = model
        self.tokenizer = tokenizer
        self.lens_k = lens_k
        self.seen: dict[str, dict[int, SteeringSet]] = {"policy": {}, "fit": {}}
        self.loop_metrics: dict[int, list[dict[str, Any]]] = {}
        self.observed: dict[int, ObservedSummary] = {}
        """Candidates and 2-D coordinates of the iterations seen (or read back on resume)."""

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
        if self.model is not None:
            try:
                self.record_lens(result)
            except Exception as err:
                _warn(f"could not read the logit lens of iteration {t}", err)
        if not self.figures:
            return
        try:
            self.write_figures()
        except Exception as err:
            _warn(f"could not write the figures after iteration {t}", err)

    @property
    def seed(self) -> int:
        """The run's seed (the loop's separability rows use it too); 0 without a ``config.toml``."""
        return int(self.folder.read_config_table().get("seed", 0))

    def rows(self, result: Any) -> list[dict[str, Any]]:
        """The analysis rows of one iteration: geometry of the steered layers, candidates and
        separability of every observed layer."""
        t = int(result.iteration)
        rows = geometry_rows(
            t,
            result.policy,
            previous=self._steering(t - 1, "policy"),
            first=result.policy if t == 1 else self._steering(1, "policy"),
            fit=result.fitted,
            previous_fit=self._steering(t - 1, "fit"),
        )
        observed = observed_of(result)
        measured: set[int | None] = set()
        if observed is not None:
            rows += self._observed_rows(observed, result.policy)
            measured = set(observed.observed_layers)
        # steered layers the loop did not observe (observe = "none", a partial list, older loops): it
        # measured their separability itself (same function, inputs, prompt groups and seed), so reuse its rows
        for row in result.metrics:
            if row["split"] == "train" and row["metric"] in SEPARABILITY_METRICS and row["layer"] not in measured:
                rows.append({**row, "iteration": t, "split": "analysis"})
        return rows

    def _observed_rows(self, observed: PairActivations, policy: SteeringSet | None) -> list[dict[str, Any]]:
        t = observed.iteration
        summary = summarize(observed)
        self.observed[t] = summary
        previous = self._summary(t - 1)
        first = summary if t == 1 else self._summary(1)
        return observed_rows(
            observed,
            summary=summary,
            previous=previous.by_hook() if previous is not None else None,
            first=first.by_hook() if first is not None else None,
            policy=policy,
            seed=self.seed,
        )

    def record(self, result: Any) -> None:
        """Append this iteration's rows to the analysis metrics (replacing any earlier rows of it)."""
        t = int(result.iteration)
        existing = self.folder.read_analysis_metrics()
        existing = existing[existing["iteration"] < t]
        new = tidy_metrics(pd.DataFrame(self.rows(result)))
        frames = [f for f in (existing, new) if len(f)]
        self.folder.write_analysis_metrics(pd.concat(frames, ignore_index=True) if frames else new)

    def record_lens(self, result: Any) -> pd.DataFrame | None:
        """The logit lens of every observed layer's candidate into ``RUN/logit_lens.csv`` (this iteration's rows
        replaced); None (nothing written) for a result without observed activations."""
        t = int(result.iteration)
        summary = self.observed.get(t)
        if summary is None:
            observed = observed_of(result)
            if observed is None:
                return None
            summary = self.observed[t] = summarize(observed)
        frame = lens_rows(self.model, t, summary.by_hook(), k=self.lens_k, tokenizer=self.tokenizer)
        replace_lens(self.folder.path, frame)
        return frame

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
        self.observed = load_summaries(self.folder.path, self.observed)
        return write_index(self.folder.path, data, observed=self.observed)

    def _summary(self, iteration: int) -> ObservedSummary | None:
        """An iteration's candidates: seen in this session, else read from the run folder (resumed runs)."""
        if iteration < 1:
            return None
        if iteration not in self.observed:
            observed = load_observed(self.folder.path, iteration)
            if observed is None:
                return None
            self.observed[iteration] = summarize(observed)
        return self.observed[iteration]

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


def write_run_lens(
    run_dir: str | Path,
    model: Any,
    tokenizer: Any = None,
    *,
    k: int = LENS_K,
    overwrite: bool = False,
    summaries: dict[int, ObservedSummary] | None = None,
) -> pd.DataFrame:
    """The logit lens of every observed iteration's candidates into ``RUN/logit_lens.csv``, after the fact.

    For a run whose live analysis had no model (``sims-lens run`` before the model was passed, a
    notebook's :func:`analysis.small_run.ensure_run`). Iterations that already have rows are kept
    unless ``overwrite``. Returns the whole table as it is now.
    """
    done: set[int] = set() if overwrite else {int(t) for t in read_lens(run_dir)["iteration"]}
    summaries = load_summaries(run_dir, summaries)
    frames = [
        lens_rows(model, t, summary.by_hook(), k=k, tokenizer=tokenizer)
        for t, summary in summaries.items()
        if t not in done
    ]
    if frames:
        replace_lens(run_dir, pd.concat(frames, ignore_index=True))
    return read_lens(run_dir)


def live_callbacks(run_dir: str | Path, model: Any = None, tokenizer: Any = None) -> list[LiveAnalysis]:
    """The analysis callbacks the CLI adds to a run writing into ``run_dir``.

    Pass the run's ``model`` and ``tokenizer`` for the logit lens of every observed layer's
    candidate after each iteration (``RUN/logit_lens.csv``, the table on ``index.html``).
    """
    return [LiveAnalysis(run_dir, model=model, tokenizer=tokenizer)]


def _warn(what: str, err: BaseException) -> None:
    message = (str(err).strip().splitlines() or [""])[0]
    print(f"warning: analysis {what}: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
