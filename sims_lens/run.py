"""A SIMS run backed by a run folder: persist each iteration, restore an interrupted run.

:class:`RunWriter` is the loop callback that writes each finished iteration through
:class:`~sims_lens.run_folder.RunFolder` (``Sims(..., out=...)`` attaches it); :func:`restore_state`
rebuilds the loop state of an interrupted run so that :meth:`Sims.iterate` goes on after its last
finished iteration; :func:`writing_run_folder` joins the two while ``Sims(..., out=...)`` iterates.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sims_lens.config import SimsConfig
from sims_lens.contrast import MemoryBank, PairKey, Sample
from sims_lens.iteration import IterationResult, LoopState
from sims_lens.prompts import GIVEN
from sims_lens.run_folder import RunFolder, open_run
from sims_lens.steering.functions import SteeringSet, layer_of
from sims_lens.steering.io import save_steering


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
        if result.activations.observed_hooks:  # observe = "none" writes no file
            self.folder.save_observed(result.activations)
        self.folder.append_samples([s.to_record() for s in result.samples])
        self.folder.append_pairs([p.to_record(result.iteration, not result.rejected) for p in result.selection.pairs])
        self.folder.append_metrics(result.metrics)
        self.folder.finish_iteration(
            result.iteration, [layer for h in result.hooks if (layer := layer_of(h)) is not None]
        )


def restore_state(
    folder: RunFolder, config: SimsConfig, model: Any, tokenizer: Any, init: SteeringSet | None = None
) -> LoopState:
    """The loop state of a run folder: finished iterations, policy, layers, base evaluation, memory bank.

    Before its first finished iteration the policy is ``init`` (None: the base model).
    """
    done = folder.completed_iterations
    state = LoopState(completed=done, base_heldout=folder.load_base(), layers=folder.read_state().get("layers"))
    state.policy = folder.load_steering(done, "policy", model) if done else init
    if config.contrast_sampling:
        state.bank = MemoryBank(config.contrast.bank_size)
        records = folder.read_samples()
        if records and "index" not in records[0]:  # written before samples carried their index
            seen: dict[tuple[int, str], int] = {}
            for record in records:
                where = (record["iteration"], record["prompt_id"])
                record["index"] = seen[where] = seen.get(where, -1) + 1
        state.bank.add([Sample.from_record(r, tokenizer) for r in records])
        state.bank.mark_used(_pair_key(r) for r in folder.read_pairs() if r.get("applied", True))
    return state


def _pair_key(record: dict[str, Any]) -> PairKey:
    pid, pos, neg = record["prompt_id"], record["positive"], record["negative"]
    return ((int(pos["iteration"]), pid, int(pos["index"])), (int(neg["iteration"]), pid, int(neg["index"])))


@contextmanager
def writing_run_folder(sims: Any) -> Iterator[None]:
    """While the body runs: ``sims.out`` opened (or resumed) under its lock, ``sims.state`` restored from
    it, and a :class:`RunWriter` first among ``sims.callbacks`` (what ``Sims(..., out=...)`` does)."""
    folder = RunFolder(sims.out)
    with folder.lock():
        folder, sims.config, done = open_run(folder.path, sims.config, sims.resume)
        sims.resume = True  # the folder is this run's now: iterating again goes on from it
        if not done:
            folder.keep_prompts(sims.given_prompts)
            if sims.init is not None and sims.config.init.startswith(GIVEN):  # given as an object
                save_steering(sims.init, folder.init_path, sims.model)
        sims.state = restore_state(folder, sims.config, sims.model, sims.tokenizer, init=sims.init)
        writer = RunWriter(folder, sims.model)
        sims.callbacks.insert(0, writer)
        try:
            yield
        finally:
            sims.callbacks.remove(writer)
