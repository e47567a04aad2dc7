"""A run folder read back into memory: configuration, state, steering per iteration, tidy metrics.

Everything the figures and the report need comes from the folder alone (DESIGN.md section 4), so
they can be rebuilt after the fact, from a finished or a partial run.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sims_lens.steering.functions import SteeringSet
from sims_lens.steering.io import load_steering

METRIC_COLUMNS = ["iteration", "split", "metric", "layer", "value"]
ANALYSIS_METRICS = "analysis_metrics.csv"
_STEERING_RE = re.compile(r"^(iter|update)_(\d+)\.safetensors$")


@dataclass
class RunData:
    """What a run folder holds, in memory. ``policies``/``updates`` are keyed by iteration."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    policies: dict[int, SteeringSet] = field(default_factory=dict)
    updates: dict[int, SteeringSet] = field(default_factory=dict)
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


def empty_metrics() -> pd.DataFrame:
    return tidy_metrics(pd.DataFrame(columns=METRIC_COLUMNS))


def tidy_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """Normalise a metrics table's types: int iteration, str split/metric, float layer (NaN = none) and value."""
    frame = frame.reindex(columns=METRIC_COLUMNS).copy()
    frame["iteration"] = pd.to_numeric(frame["iteration"]).astype("int64")
    frame["split"] = frame["split"].astype(str)
    frame["metric"] = frame["metric"].astype(str)
    frame["layer"] = pd.to_numeric(frame["layer"], errors="coerce").astype("float64")
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
    return frame


def read_metrics(path: Path) -> pd.DataFrame:
    """A tidy metrics CSV (empty if the file does not exist)."""
    if not path.is_file() or path.stat().st_size == 0:
        return empty_metrics()
    return tidy_metrics(pd.read_csv(path))


def write_metrics(path: Path, frame: pd.DataFrame) -> None:
    """Write a tidy metrics table as CSV (layer empty where it does not apply), atomically."""
    frame = tidy_metrics(frame)
    out = frame.astype({"layer": "Int64"})
    tmp = path.with_name(f".{path.name}.tmp")
    out.to_csv(tmp, index=False)
    tmp.replace(path)


def steering_files(run_dir: Path, kind: str = "iter") -> dict[int, Path]:
    """``steering/{kind}_NNN.safetensors`` files by iteration (``kind`` is ``iter`` or ``update``)."""
    folder = run_dir / "steering"
    if not folder.is_dir():
        return {}
    out = {}
    for path in folder.iterdir():
        match = _STEERING_RE.match(path.name)
        if match and match.group(1) == kind:
            out[int(match.group(2))] = path
    return dict(sorted(out.items()))


def load_run(run_dir: str | Path, require: bool = True) -> RunData:
    """Read a run folder. ``require``: the folder must exist and hold ``metrics.csv`` (else ValueError).

    Steering of iterations beyond ``state.json``'s ``completed_iterations`` (an iteration that did
    not finish) is skipped, like the loop's own resume does.
    """
    path = Path(run_dir)
    if require:
        if not path.is_dir():
            raise ValueError(f"run folder {path} does not exist")
        if not (path / "metrics.csv").is_file():
            raise ValueError(f"{path} has no metrics.csv; is it a run folder (made by 'sims-lens run')?")
    data = RunData(path)
    if (path / "config.toml").is_file():
        data.config = tomllib.loads((path / "config.toml").read_text())
    if (path / "state.json").is_file():
        try:
            data.state = json.loads((path / "state.json").read_text())
        except json.JSONDecodeError:
            data.state = {}
    limit = data.state.get("completed_iterations")
    for kind, target in (("iter", data.policies), ("update", data.updates)):
        for iteration, file in steering_files(path, kind).items():
            if limit is None or iteration <= int(limit):
                target[iteration] = load_steering(file)
    metrics = read_metrics(path / "metrics.csv")
    analysis = read_metrics(path / ANALYSIS_METRICS)
    if limit is not None:
        metrics = metrics[metrics["iteration"] <= int(limit)].reset_index(drop=True)
        analysis = analysis[analysis["iteration"] <= int(limit)].reset_index(drop=True)
    data.metrics, data.analysis = metrics, analysis
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
