"""The run folder (DESIGN.md section 4): config, samples, steering, metrics, state; resume.

Layout::

    RUN/config.toml                 the resolved configuration
    RUN/samples.jsonl               one object per sampled response (iteration, prompt_id, prompt, response,
                                    reward, label in "+", "-", "")
    RUN/steering/iter_001.safetensors (+ .json metadata)   the policy after each iteration
    RUN/metrics.csv                 tidy: iteration, split, metric, layer, value
    RUN/heldout_base.jsonl          the base model's held-out responses and rewards (iteration 0)
    RUN/state.json                  the last finished iteration; written last, so a crash mid-iteration
                                    loses only that iteration

Files are appended only after an iteration has finished; a resumed run first drops any rows
of an unfinished iteration.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sims_lens.chat import Exchange, encode_chat
from sims_lens.config import SimsConfig, config_from_dict, config_to_dict, resolve_layers, save_config
from sims_lens.contrast import MemoryBank, Sample
from sims_lens.evaluation import Evaluation
from sims_lens.loop import Callback, IterationResult, LoopState, MetricRow, Sims, heldout_metrics
from sims_lens.steering.io import load_steering, save_steering

METRIC_COLUMNS = ["iteration", "split", "metric", "layer", "value"]


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (exists without --resume, config mismatch, ...)."""


@dataclass
class RunFolder:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    def steering_path(self, iteration: int) -> Path:
        return self.path / "steering" / f"iter_{iteration:03d}.safetensors"

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
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_path)

    def append_jsonl(self, name: str, records: Sequence[dict[str, Any]]) -> None:
        with (self.path / name).open("a") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise RunFolderError(
                        f"{path} line {number} is not valid JSON ({err}); repair or remove it"
                    ) from None
        return records

    def append_metrics(self, rows: Sequence[MetricRow]) -> None:
        path = self.path / "metrics.csv"
        new = not path.is_file()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({**row, "layer": "" if row["layer"] is None else row["layer"]})

    def truncate_after(self, iteration: int) -> None:
        """Drop rows written by an iteration that did not finish (crash between writes).

        A line torn by a crash can only belong to the unfinished iteration, so unreadable lines go too.
        """
        path = self.path / "samples.jsonl"
        samples = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["iteration"] <= iteration:
                samples.append(record)
        (self.path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
        metrics = self.path / "metrics.csv"
        if metrics.is_file():
            with metrics.open() as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["iteration"]) <= iteration]
            with metrics.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)

    def save_base(self, evaluation: Evaluation) -> None:
        reference: list[float | None] = (
            list(evaluation.reference_rewards) if evaluation.reference_rewards else [None] * len(evaluation.rewards)
        )
        records = [
            {
                "prompt_id": pid,
                "response": resp,
                "reward": reward,
                "reference_reward": ref,
                "nll": nll,
                "response_ids": list(ex.response_ids),
                "prompt_ids": list(ex.prompt_ids),
            }
            for pid, resp, reward, ref, nll, ex in zip(
                evaluation.prompt_ids,
                evaluation.responses,
                evaluation.rewards,
                reference,
                evaluation.nll,
                evaluation.exchanges,
                strict=True,
            )
        ]
        (self.path / "heldout_base.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def load_base(self) -> Evaluation | None:
        records = self.read_jsonl("heldout_base.jsonl")
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


def prepare_folder(out: Path, config: SimsConfig | None, resume: bool) -> tuple[RunFolder, SimsConfig, int]:
    """Create or reopen a run folder; returns it, the config to use and the last finished iteration.

    On resume, ``config`` None means "the saved one"; a given config must equal the saved one except
    for ``iterations``, which may grow.
    """
    folder = RunFolder(out)
    if resume:
        if not folder.config_path.is_file():
            raise RunFolderError(f"cannot resume: {out} has no config.toml (start a run there without --resume)")
        import tomllib

        try:
            saved = config_from_dict(tomllib.loads(folder.config_path.read_text()))
        except tomllib.TOMLDecodeError as err:
            raise RunFolderError(f"{folder.config_path} is not valid TOML ({err})") from None
        if config is not None:
            mine, theirs = config_to_dict(config), config_to_dict(saved)
            changed = sorted(k for k in mine if k != "iterations" and mine[k] != theirs[k])
            if changed:
                raise RunFolderError(
                    f"cannot resume {out} with a different configuration (changed: {', '.join(changed)}); "
                    "resume with the same config (only 'iterations' may change) or use a new --out folder"
                )
            saved.iterations = config.iterations
        done = int(folder.read_state().get("completed_iterations", 0))
        if saved.iterations < done:
            raise RunFolderError(f"{out} already finished {done} iterations; 'iterations' cannot go below that")
        folder.truncate_after(done)
        save_config(saved, folder.config_path)
        return folder, saved, done
    check_new_folder(out)
    config = config or SimsConfig()
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, folder.config_path)
    folder.write_state({"completed_iterations": 0})
    return folder, config, 0


def check_new_folder(out: Path) -> None:
    """Refuse a path that is a file or already holds something (a new run never overwrites)."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file; pass a folder for the run")
    if out.exists() and any(out.iterdir()):
        raise RunFolderError(f"{out} already holds a run; pass --resume to continue it, or choose a new --out folder")


def restore_state(folder: RunFolder, sims: Sims, done: int) -> LoopState:
    """Rebuild the loop state of a run that finished ``done`` iterations."""
    state = folder.read_state()
    loop = LoopState(base_heldout=folder.load_base(), layers=state.get("layers"))
    if done:
        loop.policy = load_steering(folder.steering_path(done), sims.model)
    if sims.config.contrast_sampling:
        loop.bank = MemoryBank(sims.config.contrast.bank_size)
        loop.bank.add([_sample_from_record(r, sims.tokenizer) for r in folder.read_jsonl("samples.jsonl")])
    return loop


def _sample_from_record(record: dict[str, Any], tokenizer: Any) -> Sample:
    exchange = Exchange(tuple(encode_chat(tokenizer, record["prompt"])), tuple(record["response_ids"]))
    return Sample(
        record["iteration"],
        record["prompt_id"],
        record["prompt"],
        record["response"],
        exchange,
        float(record["reward"]),
        record.get("label", ""),
    )


class RunWriter:
    """A loop callback that persists each finished iteration into the run folder."""

    def __init__(self, folder: RunFolder, model: Any) -> None:
        self.folder = folder
        self.model = model

    def on_phase(self, iteration: int, phase: str, payload: dict[str, Any]) -> None:
        return None

    def on_iteration(self, result: IterationResult) -> None:
        save_steering(result.policy, self.folder.steering_path(result.iteration), self.model)
        save_steering(
            result.update, self.folder.path / "steering" / f"update_{result.iteration:03d}.safetensors", self.model
        )
        self.folder.append_jsonl("samples.jsonl", [s.to_record() for s in result.samples])
        self.folder.append_metrics(result.metrics)
        state = self.folder.read_state()
        state.update(completed_iterations=result.iteration, layers=[int(h.split(".")[1]) for h in result.hooks])
        self.folder.write_state(state)


def run_iterations(sims: Sims, folder: RunFolder, done: int) -> Iterator[IterationResult]:
    """Drive the loop from the iteration after ``done``, persisting base evaluation and iterations."""
    loop_state = restore_state(folder, sims, done)
    had_base = loop_state.base_heldout is not None
    loop_state = sims.start(loop_state)
    if not had_base:  # nothing can be finished without the base evaluation: start the records afresh
        assert loop_state.base_heldout is not None
        folder.truncate_after(-1)
        folder.append_metrics(heldout_metrics(0, loop_state.base_heldout, None))
        folder.save_base(loop_state.base_heldout)
    sims.state = loop_state
    for iteration in range(done + 1, sims.config.iterations + 1):
        yield sims.step(iteration, loop_state)


def sims_from_config(
    config: SimsConfig,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
) -> Sims:
    """Load the model, prompts, oracle and learner a configuration names."""
    from sims_lens.models import load_model
    from sims_lens.oracles import make_oracle
    from sims_lens.prompts import load_prompts
    from sims_lens.steering.learners import make_learner

    learner = make_learner(config.learner, **config.learner_settings())
    train = load_prompts(config.prompts, "train" if config.prompts == "builtin" else None)
    heldout = load_prompts(config.heldout_prompts, "heldout" if config.heldout_prompts == "builtin" else None)
    if config.prompts == config.heldout_prompts and config.prompts != "builtin":
        raise ValueError("prompts and heldout_prompts are the same file; evaluate on prompts the loop never trains on")
    heldout = heldout[: config.heldout_size]
    if len(train) < config.prompts_per_iteration:
        raise ValueError(f"prompts_per_iteration={config.prompts_per_iteration} but only {len(train)} training prompts")
    if model is None:
        model, tokenizer = load_model(config.model, dtype=config.dtype)
    resolve_layers(config.layers, int(model.cfg.n_layers))  # an unknown layer fails here, before any work
    oracle = make_oracle(config.oracle, config.oracle_settings(), model=model, tokenizer=tokenizer)
    if config.contrast_sampling and getattr(oracle, "relative", False):
        raise ValueError(
            f"contrast_sampling needs rewards that compare across prompts and iterations, but {config.oracle!r} only "
            "ranks the responses of one prompt; turn contrast_sampling off or use an absolute oracle "
            "(lexicon_sentiment, reward_model, embedding_similarity)"
        )
    reference = None
    if config.reference_oracle:
        reference = make_oracle(
            config.reference_oracle,
            dict(config.oracles.get(config.reference_oracle, {})),
            model=model,
            tokenizer=tokenizer,
        )
    return Sims(model, tokenizer, config, train, heldout, oracle, learner, callbacks, progress, reference=reference)
