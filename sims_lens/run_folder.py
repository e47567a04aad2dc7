"""The run folder: the one place that names, writes and reads every file of a SIMS run.

Layout (ARCHITECTURE.md, "The run folder")::

    RUN/config.toml                  the resolved configuration
    RUN/state.json                   finished iterations and the steered layers; written last
    RUN/samples.jsonl                one object per sampled response (iteration, prompt_id, index,
                                     prompt, response, reward, label in "+", "-", "")
    RUN/pairs.jsonl                  one object per D+/D- pair used in an update: update, prompt_id,
                                     positive / negative (iteration, index, reward), margin
    RUN/heldout_base.jsonl           the base model's held-out responses and scores (iteration 0)
    RUN/metrics.csv                  tidy: iteration, split, metric, layer, value
    RUN/analysis_metrics.csv         the analysis callbacks' rows, same columns
    RUN/logit_lens.csv               the analysis callbacks' logit-lens reading of each layer's candidate
    RUN/steering/iter_NNN.safetensors  the policy after iteration NNN (+ .json metadata)
    RUN/steering/fit_NNN.safetensors   what iteration NNN fitted, before the update rule
    RUN/steering/init.safetensors    the policy the run started from, when given to Sims as an object
    RUN/observed/iter_NNN.safetensors  iteration NNN's D+ / D- mean activations at every observed
                                     layer (tensors positives, negatives [n_pairs, n_observed, d_model];
                                     hooks, layers, prompt_ids in the header)
    RUN/prompts.jsonl, heldout_prompts.jsonl  prompts given to Sims as Python lists (config.toml
                                     records "python:N prompts HASH" for them)
    RUN/figures/                     plotly pages rewritten after every iteration
    RUN/.lock                        held by the process writing the run (its pid)

Records of an iteration are appended only after it has finished and ``state.json`` is written
last, so a crash loses at most the unfinished iteration; reopening drops its partial rows (and its
observed file). Readers ignore rows and files of iterations past ``completed_iterations``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import sys
import tomllib
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sims_lens.activations import PairActivations
from sims_lens.chat import Exchange
from sims_lens.config import SimsConfig, config_from_dict, config_to_dict, save_config
from sims_lens.evaluation import Evaluation
from sims_lens.files import write_atomic
from sims_lens.metrics import METRIC_COLUMNS, MetricRow, empty_metrics, tidy_metrics
from sims_lens.prompts import BUILTIN, Prompt, load_prompts
from sims_lens.steering.functions import SteeringSet, layer_of
from sims_lens.steering.io import load_steering, save_steering

CONFIG = "config.toml"
STATE = "state.json"
SAMPLES = "samples.jsonl"
PAIRS = "pairs.jsonl"
BASE_HELDOUT = "heldout_base.jsonl"
METRICS = "metrics.csv"
ANALYSIS_METRICS = "analysis_metrics.csv"
LOGIT_LENS = "logit_lens.csv"
STEERING = "steering"
OBSERVED = "observed"
FIGURES = "figures"
LOCK = ".lock"
INIT = "init.safetensors"
PROMPT_COPIES = {"prompts": "prompts.jsonl", "heldout_prompts": "heldout_prompts.jsonl"}
"""Where a run keeps prompts given to ``Sims`` as lists (its config.toml records ``python:N prompts HASH``)."""

STEERING_STEMS = {"policy": "iter", "fit": "fit"}
"""File stem of each kind of steering file: the policy after an iteration, or that iteration's fit."""


OBSERVED_FORMAT = "sims-lens-observed"
OBSERVED_FORMAT_VERSION = 1


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (exists without --resume, config mismatch, locked, ...)."""


@dataclass(frozen=True)
class RunFolder:
    """A run folder on disk; every file name of a run is spelled here and nowhere else."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    # -- names ------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def state_path(self) -> Path:
        return self.path / STATE

    @property
    def samples_path(self) -> Path:
        return self.path / SAMPLES

    @property
    def pairs_path(self) -> Path:
        return self.path / PAIRS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def analysis_metrics_path(self) -> Path:
        return self.path / ANALYSIS_METRICS

    @property
    def logit_lens_path(self) -> Path:
        """The analysis callbacks' logit-lens readings: iteration, layer, rank, promoted/suppressed token, logit."""
        return self.path / LOGIT_LENS

    @property
    def base_path(self) -> Path:
        return self.path / BASE_HELDOUT

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    @property
    def init_path(self) -> Path:
        """``steering/init.safetensors``: the policy a run started from, when it was given as an object."""
        return self.path / STEERING / INIT

    def steering_path(self, iteration: int, which: str = "policy") -> Path:
        """``steering/iter_NNN.safetensors`` (``which="policy"``) or ``steering/fit_NNN.safetensors``."""
        return self.path / STEERING / f"{STEERING_STEMS[which]}_{iteration:03d}.safetensors"

    @property
    def observed_dir(self) -> Path:
        return self.path / OBSERVED

    def observed_path(self, iteration: int) -> Path:
        """``observed/iter_NNN.safetensors``: iteration NNN's activations at the observed layers."""
        return self.observed_dir / f"iter_{iteration:03d}.safetensors"

    # -- configuration and state ------------------------------------------------------------
    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config_table(self) -> dict[str, Any]:
        """``config.toml`` as a plain dictionary (empty if there is none)."""
        if not self.config_path.is_file():
            return {}
        try:
            return tomllib.loads(self.config_path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise RunFolderError(
                f"{self.config_path} is not valid TOML ({err}); repair it or start a new run"
            ) from None

    def read_config(self) -> SimsConfig:
        """``config.toml`` as a validated configuration."""
        if not self.config_path.is_file():
            raise RunFolderError(f"{self.path} has no {CONFIG}; is it a run folder (made by 'sims-lens run')?")
        return config_from_dict(self.read_config_table())

    def write_config(self, config: SimsConfig) -> None:
        save_config(config, self.config_path)

    def read_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"completed_iterations": 0}
        try:
            state: dict[str, Any] = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as err:
            raise RunFolderError(
                f"{self.state_path} is not valid JSON ({err}); restore it or start a new run"
            ) from None
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.state_path, json.dumps(state, indent=2) + "\n")

    @property
    def completed_iterations(self) -> int:
        """The iterations ``state.json`` records as finished (0 when there is no readable state)."""
        try:
            return int(self.read_state().get("completed_iterations", 0))
        except (RunFolderError, OSError, ValueError):
            return 0

    def finish_iteration(self, iteration: int, layers: Sequence[int]) -> None:
        """Mark ``iteration`` finished (the last write of an iteration)."""
        state = self.read_state()
        state.update(completed_iterations=iteration, layers=[int(layer) for layer in layers])
        self.write_state(state)

    # -- samples and metrics ----------------------------------------------------------------
    def append_samples(self, records: Sequence[dict[str, Any]]) -> None:
        _append_jsonl(self.samples_path, records)

    def read_samples(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.samples_path)

    def append_pairs(self, records: Sequence[dict[str, Any]]) -> None:
        _append_jsonl(self.pairs_path, records)

    def read_pairs(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.pairs_path)

    def append_metrics(self, rows: Sequence[MetricRow]) -> None:
        new = not self.metrics_path.is_file()
        with self.metrics_path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({**row, "layer": "" if row["layer"] is None else row["layer"]})

    def read_metrics(self) -> pd.DataFrame:
        """``metrics.csv`` as a tidy frame, without rows of unfinished iterations."""
        return self._finished(_read_metrics_csv(self.metrics_path))

    def read_analysis_metrics(self) -> pd.DataFrame:
        """``analysis_metrics.csv`` as a tidy frame, without rows of unfinished iterations."""
        return self._finished(_read_metrics_csv(self.analysis_metrics_path))

    def write_analysis_metrics(self, frame: pd.DataFrame) -> None:
        """Replace ``analysis_metrics.csv`` (atomically; layer empty where it does not apply)."""
        self.path.mkdir(parents=True, exist_ok=True)
        out = tidy_metrics(frame).astype({"layer": "Int64"})
        write_atomic(self.analysis_metrics_path, out.to_csv(index=False))

    def _finished(self, frame: pd.DataFrame) -> pd.DataFrame:
        if not self.state_path.is_file():
            return frame
        return frame[frame["iteration"] <= self.completed_iterations].reset_index(drop=True)

    # -- steering -----------------------------------------------------------------------------
    def save_steering(self, steering: SteeringSet, iteration: int, which: str = "policy", model: Any = None) -> Path:
        return save_steering(steering, self.steering_path(iteration, which), model)

    def load_steering(self, iteration: int, which: str = "policy", model: Any = None) -> SteeringSet | None:
        """The steering saved for ``iteration`` (None if there is none)."""
        path = self.steering_path(iteration, which)
        return load_steering(path, model) if path.is_file() else None

    def steering_iterations(self, which: str = "policy") -> list[int]:
        """Finished iterations that have a ``which`` steering file, in order."""
        found = _numbered(self.path / STEERING, STEERING_STEMS[which])
        if self.state_path.is_file():
            found = [t for t in found if t <= self.completed_iterations]
        return found

    # -- observed layers ----------------------------------------------------------------------
    def save_observed(self, activations: PairActivations) -> Path:
        """Write ``observed/iter_NNN.safetensors`` (via a temporary file): the tensors ``positives`` and
        ``negatives`` (float32 ``[n_pairs, n_observed, d_model]``: the observed view of ``activations``)
        and, as JSON in the safetensors header, ``hooks``, ``layers``, ``prompt_ids`` and ``iteration``."""
        hooks = [str(h) for h in activations.observed_hooks]
        if not hooks:
            raise ValueError("save_observed: no observed hooks (observe = 'none' writes no file)")
        layers = [layer_of(h) for h in hooks]
        if None in layers:
            raise ValueError(f"save_observed: every observed hook must be a layer's (blocks.L.*), got {hooks}")
        meta = {
            "format": OBSERVED_FORMAT,
            "format_version": OBSERVED_FORMAT_VERSION,
            "iteration": int(activations.iteration),
            "hooks": hooks,
            "layers": layers,
            "prompt_ids": [str(p) for p in activations.prompt_ids],
        }
        tensors = {
            "positives": activations.observed_positives.detach().float().contiguous().cpu(),
            "negatives": activations.observed_negatives.detach().float().contiguous().cpu(),
        }
        path = self.observed_path(activations.iteration)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"sims_lens": json.dumps(meta)})
        os.replace(tmp, path)
        return path

    def load_observed(self, iteration: int) -> PairActivations | None:
        """Iteration ``iteration``'s observed activations (None if it has no file or is not finished)."""
        path = self.observed_path(iteration)
        if not path.is_file() or (self.state_path.is_file() and iteration > self.completed_iterations):
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                positives, negatives = handle.get_tensor("positives"), handle.get_tensor("negatives")
            meta = json.loads(header["sims_lens"])
            prompt_ids = list(meta["prompt_ids"] if "prompt_ids" in meta else meta["groups"])  # older files: groups
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise RunFolderError(f"{path} is not a readable observed-activations file ({err})") from None
        if meta.get("format") != OBSERVED_FORMAT:
            raise RunFolderError(f"{path} is not a sims-lens observed-activations file (format {meta.get('format')!r})")
        try:
            return PairActivations(
                int(meta["iteration"]),
                [str(p) for p in prompt_ids],
                observed_hooks=list(meta["hooks"]),
                observed_positives=positives.to(torch.float32),
                observed_negatives=negatives.to(torch.float32),
            )
        except ValueError as err:
            raise RunFolderError(f"{path}: {err}") from None

    # -- prompts given as lists -------------------------------------------------------------
    def keep_prompts(self, given: Mapping[str, Sequence[Prompt]]) -> None:
        """Keep a copy of prompts given as lists (``prompts`` / ``heldout_prompts``), so the run can be re-read."""
        for key, prompts in given.items():
            text = "".join(json.dumps({"id": p.id, "prompt": p.text}) + "\n" for p in prompts)
            write_atomic(self.path / PROMPT_COPIES[key], text)

    def load_prompts(self, key: str, config: SimsConfig | None = None) -> list[Prompt]:
        """The run's ``prompts`` or ``heldout_prompts`` (all of them): its copy of a given list, else their source."""
        config = config or self.read_config()
        source = str(getattr(config, key))
        if source.startswith("python:"):
            copy = self.path / PROMPT_COPIES[key]
            if not copy.is_file():
                raise RunFolderError(
                    f"{self.path}: {key} = {source!r} were given in Python, and {copy.name} is missing"
                )
            return load_prompts(copy)
        return load_prompts(source, ("train" if key == "prompts" else "heldout") if source == BUILTIN else None)

    def heldout_prompts(self, config: SimsConfig | None = None) -> list[Prompt]:
        """The held-out prompts the run measured every policy on (the first ``heldout_size``)."""
        config = config or self.read_config()
        return self.load_prompts("heldout_prompts", config)[: config.heldout_size]

    def observed_iterations(self) -> list[int]:
        """Finished iterations that have an ``observed/iter_NNN.safetensors`` file, in order."""
        found = _numbered(self.observed_dir, "iter")
        if self.state_path.is_file():
            found = [t for t in found if t <= self.completed_iterations]
        return found

    # -- the base model's held-out evaluation -------------------------------------------------
    def save_base(self, evaluation: Evaluation) -> None:
        reference: list[float | None] = [None] * len(evaluation.rewards)
        if evaluation.reference_rewards:
            reference = list(evaluation.reference_rewards)
        records = [
            {
                "prompt_id": pid,
                "response": response,
                "reward": reward,
                "reference_reward": ref,
                "nll": nll,
                "response_ids": list(ex.response_ids),
                "prompt_ids": list(ex.prompt_ids),
            }
            for pid, response, reward, ref, nll, ex in zip(
                evaluation.prompt_ids,
                evaluation.responses,
                evaluation.rewards,
                reference,
                evaluation.nll,
                evaluation.exchanges,
                strict=True,
            )
        ]
        write_atomic(self.base_path, "".join(json.dumps(r) + "\n" for r in records))

    def load_base(self) -> Evaluation | None:
        records = _read_jsonl(self.base_path)
        if not records:
            return None
        return Evaluation(
            [r["prompt_id"] for r in records],
            [r["response"] for r in records],
            [Exchange(tuple(r["prompt_ids"]), tuple(r["response_ids"])) for r in records],
            [float(r["reward"]) for r in records],
            [float(r["nll"]) for r in records],
            None if records[0].get("reference_reward") is None else [float(r["reference_reward"]) for r in records],
        )

    # -- lifecycle ----------------------------------------------------------------------------
    def truncate_after(self, iteration: int) -> None:
        """Drop rows written by iterations after ``iteration`` (a crash between writes).

        A line torn by a crash can only belong to the unfinished iteration, so unreadable lines go too.
        """
        for path, key in ((self.samples_path, "iteration"), (self.pairs_path, "update")):
            kept = []
            for line in path.read_text().splitlines() if path.is_file() else []:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record[key] <= iteration:
                    kept.append(record)
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        if self.metrics_path.is_file():
            with self.metrics_path.open() as fh:
                rows = [r for r in csv.DictReader(fh) if _whole(r) and int(r["iteration"]) <= iteration]
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
            write_atomic(self.metrics_path, text.getvalue())  # a kill here leaves the old file whole
        for later in _numbered(self.observed_dir, "iter"):
            if later > iteration:
                self.observed_path(later).unlink(missing_ok=True)

    def live_holder(self) -> dict[str, Any] | None:
        """The process holding ``RUN/.lock`` if it is still running (its pid and host), else None."""
        holder = _read_lock(self.lock_path)
        return holder if holder is not None and _alive(holder) else None

    def drop_lock_of_other_host(self, unless: Collection[str] = ()) -> bool:
        """Remove ``RUN/.lock`` if another host holds it and that host is not in ``unless`` (the hosts
        known to be up). For a sweep retrying a cell whose node died; returns whether it dropped one."""
        holder = _read_lock(self.lock_path)
        if holder is None or holder.get("host") == socket.gethostname() or holder.get("host") in unless:
            return False
        print(f"note: taking over the lock of {self.path} from {holder['host']} (pid {holder['pid']})", file=sys.stderr)
        self.lock_path.unlink(missing_ok=True)
        return True

    def refuse_if_locked(self) -> None:
        """Raise :class:`RunFolderError` if another live process is writing this run."""
        holder = self.live_holder()
        if holder is not None:
            raise RunFolderError(
                f"{self.path} is being written by another process (pid {holder['pid']} on {holder['host']}); "
                f"wait for it to finish or stop it, or use another --out folder (lock file: {self.lock_path})"
            )

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``RUN/.lock`` while writing the run; refuse a folder another live process holds.

        A lock left by a process that is no longer running (killed, machine restarted) is taken
        over with a note on stderr.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname()}
        while True:
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self.refuse_if_locked()
                holder = _read_lock(self.lock_path)
                who = f"pid {holder['pid']}" if holder else "an unreadable lock file"
                print(f"note: taking over the lock of {self.path} from {who}, no longer running", file=sys.stderr)
                self.lock_path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(mine, fh)
            break
        try:
            yield
        finally:
            if _read_lock(self.lock_path) == mine:
                self.lock_path.unlink(missing_ok=True)


RESUME_MAY_CHANGE = ("iterations", "device")
"""Settings a resumed run may change: how far it goes, and where it runs."""


def open_run(out: str | Path, config: SimsConfig | None, resume: bool) -> tuple[RunFolder, SimsConfig, int]:
    """Create or reopen a run folder; returns it, the config to use and the last finished iteration.

    On resume, ``config`` None means "the saved one"; a given config must equal the saved one except
    for ``iterations``, which may grow, and ``device``. Rows of an unfinished iteration are dropped.
    """
    folder = RunFolder(out)
    if not resume:
        check_new_folder(folder.path)
        config = config or SimsConfig()
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.write_config(config)
        folder.write_state({"completed_iterations": 0})
        return folder, config, 0
    if not folder.has_config():
        raise RunFolderError(f"cannot resume: {folder.path} has no {CONFIG} (start a run there without --resume)")
    saved = folder.read_config()
    if config is not None:
        mine, theirs = config_to_dict(config), config_to_dict(saved)
        changed = sorted(k for k in mine if k not in RESUME_MAY_CHANGE and mine[k] != theirs[k])
        if changed:
            raise RunFolderError(
                f"cannot resume {folder.path} with a different configuration (changed: {', '.join(changed)}); "
                "resume with the same config (only 'iterations' and 'device' may change) or use a new --out folder"
            )
        saved.iterations, saved.device = config.iterations, config.device
    done = folder.completed_iterations if folder.state_path.is_file() else 0
    folder.read_state()  # an unreadable state.json is an error here, not "nothing done"
    if saved.iterations < done:
        raise RunFolderError(f"{folder.path} already finished {done} iterations; 'iterations' cannot go below that")
    folder.truncate_after(done)
    folder.write_config(saved)
    return folder, saved, done


def check_new_folder(out: Path) -> None:
    """Refuse a path that is a file or already holds something (a new run never overwrites)."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file; pass a folder for the run")
    if out.exists() and any(p.name != LOCK for p in out.iterdir()):
        raise RunFolderError(
            f"{out} already holds a run; pass --resume (Python: resume=True) to continue it, or choose a new folder"
        )


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder still runs (a lock from another host is assumed alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(int(holder["pid"]))


def _whole(row: dict[str | None, Any]) -> bool:
    """A metrics row with every field and a numeric iteration (a line torn by a crash has fewer)."""
    return None not in row and None not in row.values() and str(row["iteration"]).isdigit()


def _zombie(pid: int) -> bool:
    """A process that has exited but not been reaped (its pid still answers signals); Linux only."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def _numbered(folder: Path, stem: str) -> list[int]:
    """The NNN of every ``STEM_NNN.safetensors`` in ``folder``, sorted (empty if there is no folder)."""
    found = []
    for path in folder.glob(f"{stem}_*.safetensors") if folder.is_dir() else []:
        number = path.name[len(stem) + 1 : -len(".safetensors")]
        if number.isdigit():
            found.append(int(number))
    return sorted(found)


def _append_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("a") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RunFolderError(f"{path} line {number} is not valid JSON ({err}); repair or remove it") from None
    return records


def _read_metrics_csv(path: Path) -> pd.DataFrame:
    if not path.is_file() or path.stat().st_size == 0:
        return empty_metrics()
    return tidy_metrics(pd.read_csv(path))
