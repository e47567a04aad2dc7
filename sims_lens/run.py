"""A SIMS run backed by a run folder: build it from a configuration, persist it, resume it.

:func:`sims_from_config` loads what a configuration names (model, prompts, oracle, learner);
:class:`RunWriter` is the loop callback that writes each finished iteration through
:class:`~sims_lens.run_folder.RunFolder`; :func:`restore_state` rebuilds the loop state of an
interrupted run so that :meth:`Sims.iterate` goes on after its last finished iteration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sims_lens.chat import Exchange, encode_chat
from sims_lens.config import SimsConfig, resolve_layers, resolve_observe
from sims_lens.contrast import MemoryBank, PairKey, Sample
from sims_lens.loop import Callback, IterationResult, LoopState, Sims
from sims_lens.run_folder import RunFolder
from sims_lens.steering.functions import layer_of


class RunWriter:
    """A loop callback that persists the base evaluation and each finished iteration into a run folder."""

    def __init__(self, folder: RunFolder, model: Any) -> None:
        self.folder = folder
        self.model = model

    def on_phase(self, iteration: int, phase: str, payload: dict[str, Any]) -> None:
        if phase == "base" and payload.get("fresh"):
            # nothing can be finished without the base evaluation: the records start afresh
            self.folder.truncate_after(-1)
            self.folder.append_metrics(payload["metrics"])
            self.folder.save_base(payload["evaluation"])

    def on_iteration(self, result: IterationResult) -> None:
        self.folder.save_steering(result.policy, result.iteration, "policy", self.model)
        self.folder.save_steering(result.fitted, result.iteration, "fit", self.model)
        if result.observed_hooks:  # observe = "none" writes no file
            self.folder.save_observed(
                result.iteration,
                result.observed_hooks,
                result.observed_positives,
                result.observed_negatives,
                result.groups,
            )
        self.folder.append_samples([s.to_record() for s in result.samples])
        self.folder.append_pairs([p.to_record(result.iteration) for p in result.selection.pairs])
        self.folder.append_metrics(result.metrics)
        self.folder.finish_iteration(
            result.iteration, [layer for h in result.hooks if (layer := layer_of(h)) is not None]
        )


def restore_state(folder: RunFolder, sims: Sims) -> LoopState:
    """The loop state of a run folder: finished iterations, policy, layers, base evaluation, memory bank."""
    done = folder.completed_iterations
    state = LoopState(completed=done, base_heldout=folder.load_base(), layers=folder.read_state().get("layers"))
    if done:
        state.policy = folder.load_steering(done, "policy", sims.model)
    if sims.config.contrast_sampling:
        state.bank = MemoryBank(sims.config.contrast.bank_size)
        records = folder.read_samples()
        if records and "index" not in records[0]:  # written before samples carried their index
            seen: dict[tuple[int, str], int] = {}
            for record in records:
                where = (record["iteration"], record["prompt_id"])
                record["index"] = seen[where] = seen.get(where, -1) + 1
        state.bank.add([_sample_from_record(r, sims.tokenizer) for r in records])
        state.bank.mark_used(_pair_key(r) for r in folder.read_pairs())
    return state


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
        record.get("reference_reward"),
        int(record["index"]),
    )


def _pair_key(record: dict[str, Any]) -> PairKey:
    pid, pos, neg = record["prompt_id"], record["positive"], record["negative"]
    return ((int(pos["iteration"]), pid, int(pos["index"])), (int(neg["iteration"]), pid, int(neg["index"])))


def sims_from_config(
    config: SimsConfig,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
) -> Sims:
    """Load the model, prompts, oracle and learner a configuration names."""
    from sims_lens.models import dtype_name, load_model
    from sims_lens.oracles import is_relative, make_oracle
    from sims_lens.prompts import load_prompts
    from sims_lens.steering.learners import make_learner

    learner = make_learner(config.learner, config.learner_settings())
    train = load_prompts(config.prompts, "train" if config.prompts == "builtin" else None)
    heldout = load_prompts(config.heldout_prompts, "heldout" if config.heldout_prompts == "builtin" else None)
    if config.prompts == config.heldout_prompts and config.prompts != "builtin":
        raise ValueError("prompts and heldout_prompts are the same file; evaluate on prompts the loop never trains on")
    heldout = heldout[: config.heldout_size]
    if len(train) < config.prompts_per_iteration:
        raise ValueError(f"prompts_per_iteration={config.prompts_per_iteration} but only {len(train)} training prompts")
    if model is None:
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    config.dtype = dtype_name(next(model.parameters()).dtype)  # what "auto" became, recorded in config.toml
    resolve_layers(config.layers, int(model.cfg.n_layers))  # an unknown layer fails here, before any work
    resolve_observe(config.observe, int(model.cfg.n_layers))
    oracle = make_oracle(config.oracle, config.oracle_settings(), model=model, tokenizer=tokenizer)
    if config.contrast_sampling and is_relative(oracle):
        raise ValueError(
            f"contrast_sampling compares rewards across iterations, but the oracle {config.oracle!r} only ranks the "
            "responses of one prompt against each other (relative scores); turn contrast_sampling off or use an "
            "absolute oracle (lexicon_sentiment, reward_model, embedding_similarity, or a composite of them with "
            "normalize = 'none')"
        )
    if config.pool_size is not None and config.pool_size > len(train):
        raise ValueError(f"prompt_pool = {config.pool_size} but there are only {len(train)} training prompts")
    reference = None
    if config.reference_oracle:
        reference = make_oracle(
            config.reference_oracle, config.oracles.get(config.reference_oracle, {}), model=model, tokenizer=tokenizer
        )
    sims = Sims(model, tokenizer, config, train, heldout, oracle, learner, callbacks, progress, reference=reference)
    config.positions = sims.positions  # what "auto" became, recorded in config.toml
    return sims
