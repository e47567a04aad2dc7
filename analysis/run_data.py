"""A run folder read back into memory: configuration, state, steering per iteration, tidy metrics.

Everything the figures and the report need comes from the folder alone (ARCHITECTURE.md, "The run folder"), so
they can be rebuilt after the fact, from a finished or a partial run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sims_lens.metrics import HELDOUT_METRICS, empty_metrics
from sims_lens.run_folder import RunFolder
from sims_lens.steering.functions import SteeringSet


@dataclass
class RunData:
    """What a run folder holds, in memory. ``policies``/``fits`` are keyed by iteration."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    policies: dict[int, SteeringSet] = field(default_factory=dict)
    fits: dict[int, SteeringSet] = field(default_factory=dict)
    metrics: pd.DataFrame = field(default_factory=lambda: empty_metrics())
    analysis: pd.DataFrame = field(default_factory=lambda: empty_metrics())

    @property
    def completed_iterations(self) -> int:
        done = self.state.get("completed_iterations")
        if done is not None:
            return int(done)
        return max(self.policies, default=0)

    @property
    def all_metrics(self) -> pd.DataFrame:
        """``metrics.csv`` and ``analysis_metrics.csv`` together."""
        frames = [f for f in (self.metrics, self.analysis) if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else empty_metrics()


def load_run(run_dir: str | Path, require: bool = True) -> RunData:
    """Read a run folder. ``require``: the folder must exist and hold metrics (else ValueError).

    Steering and metrics of iterations beyond ``state.json``'s ``completed_iterations`` (an
    iteration that did not finish) are skipped, like the loop's own resume does.
    """
    folder = RunFolder(run_dir)
    if require:
        if not folder.path.is_dir():
            raise ValueError(f"run folder {folder.path} does not exist")
        if not folder.metrics_path.is_file():
            raise ValueError(
                f"{folder.path} has no {folder.metrics_path.name}; is it a run folder (made by 'sims-lens run')?"
            )
    data = RunData(folder.path, config=folder.read_config_table())
    try:
        data.state = folder.read_state() if folder.state_path.is_file() else {}
    except ValueError:
        data.state = {}
    for which, target in (("policy", data.policies), ("fit", data.fits)):
        for iteration in folder.steering_iterations(which):
            steering = folder.load_steering(iteration, which)
            if steering is not None:
                target[iteration] = steering
    data.metrics, data.analysis = folder.read_metrics(), folder.read_analysis_metrics()
    return data


def config_summary(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration keys worth a header line, in a stable order (missing keys left out)."""
    keys = [
        "model",
        "oracle",
        "learner",
        "layers",
        "hook",
        "multiplier",
        "update",
        "update_rate",
        "contrast_sampling",
        "iterations",
        "prompts_per_iteration",
        "samples_per_prompt",
        "max_new_tokens",
        "heldout_size",
        "seed",
    ]
    return {key: config[key] for key in keys if key in config}


def summary_from_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """Iteration x held-out metric (``reward_mean``, ``win_rate_vs_base``, ...) from a tidy table."""
    rows = metrics[(metrics["split"] == "heldout") & metrics["layer"].isna() & metrics["metric"].isin(HELDOUT_METRICS)]
    if rows.empty:
        return pd.DataFrame(columns=HELDOUT_METRICS, index=pd.Index([], name="iteration"))
    table = rows.pivot_table(index="iteration", columns="metric", values="value", aggfunc="last")
    table = table.reindex(columns=HELDOUT_METRICS)
    table.columns.name = None
    return table.sort_index()
