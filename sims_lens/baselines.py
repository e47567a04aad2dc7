"""Steering baselines of a run folder: what each SIMS policy is compared with in ``sims-lens eval``.

Each one controls for something else:

- ``static_first``: iteration 1's fit alone: steering without iterating (at its own norm).
- ``static_all``: one fit on every *applied* pair of ``pairs.jsonl``. For a mean difference under
  ``update = "accumulate"`` its direction is the pair-weighted mean of the iterations' fits, at
  about 1/T of the policy's norm, and its pairs were sampled by the steered policies, so it is not
  "the same data without self-improvement"; it answers "one fit on the run's pairs".
- ``static_first_matched``: iteration 1's fit rescaled, hook by hook, to iteration t's policy norm
  (:meth:`~sims_lens.steering.functions.SteeringSet.norm_matched`): iterating's direction against
  the first direction at the same length.
- ``fresh_pairs``: one fit on as many pairs as the run applied up to iteration t, all sampled from
  pi_0 on fresh training prompts (:func:`fresh_pairs`), rescaled likewise: more data, no
  self-improvement, same length.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from sims_lens.answer_cache import generate_cached
from sims_lens.chat import encode_chat
from sims_lens.config import SimsConfig
from sims_lens.contrast import Pair, Sample, select_pairs
from sims_lens.fitting import capture_selected, fit_steering, learner_positions
from sims_lens.generation import GenerationSettings, decode_response
from sims_lens.groups import chunked
from sims_lens.prompts import Prompt, split_validation
from sims_lens.run_folder import RunFolder
from sims_lens.seeds import derive_seed
from sims_lens.steering.functions import SteeringSet
from sims_lens.steering.learners import make_learner


def applied_pairs(folder: RunFolder, tokenizer: Any) -> list[tuple[int, Pair]]:
    """``(update, pair)`` for every pair of ``pairs.jsonl`` that entered the policy (a rejected iteration's did not)."""
    records = [r for r in folder.read_pairs() if r.get("applied", True)]
    by_key = {(r["iteration"], r["prompt_id"], int(r.get("index", 0))): r for r in folder.read_samples()}

    def sample(pid: str, side: dict[str, Any]) -> Sample:
        return Sample.from_record(by_key[(int(side["iteration"]), pid, int(side["index"]))], tokenizer)

    return [
        (int(r["update"]), Pair(sample(r["prompt_id"], r["positive"]), sample(r["prompt_id"], r["negative"])))
        for r in records
    ]


def fit_on_pairs(
    pairs: Sequence[Pair], folder: RunFolder, config: SimsConfig, model: Any, tokenizer: Any
) -> SteeringSet:
    """The run's learner fitted once on ``pairs`` at the run's steered layers (base-model activations)."""
    layers = folder.read_state().get("layers") or []
    activations = capture_selected(model, tokenizer, pairs, config.hook_names(layers), batch_size=config.batch_size)
    learner = make_learner(config.learner, config.learner_settings())
    return fit_steering(
        learner,
        activations,
        reduction=config.reduction,
        multiplier=config.multiplier,
        positions=learner_positions(learner, config.positions),
        model_name=str(getattr(model.cfg, "model_name", "")),
    )


def static_all(folder: RunFolder, config: SimsConfig, model: Any, tokenizer: Any) -> SteeringSet | None:
    """``static_all``: one fit on every applied pair (None with fewer than 2)."""
    pairs = [pair for _, pair in applied_pairs(folder, tokenizer)]
    return fit_on_pairs(pairs, folder, config, model, tokenizer) if len(pairs) >= 2 else None


def pairs_applied_by(folder: RunFolder, iterations: Sequence[int], tokenizer: Any) -> dict[int, int]:
    """For each iteration t, how many pairs the run had applied by then (iterations 1..t)."""
    updates = [update for update, _ in applied_pairs(folder, tokenizer)]
    return {t: sum(u <= t for u in updates) for t in iterations}


def fresh_prompts(folder: RunFolder, config: SimsConfig, exclude: Sequence[Prompt] = ()) -> list[Prompt]:
    """Training prompts for fresh pi_0 pairs: never validation, held-out or ``exclude``d ones.

    Shuffled with the run's seed. The prompts the run never sampled come first, then the run's own,
    so the fresh pairs are new prompts as far as the pool allows. ``exclude``: the prompts an
    evaluation scores on (``sims-lens eval --prompts``), which no fit may see.
    """
    train = folder.load_prompts("prompts", config)
    if config.uses_validation:  # as the loop split them
        train, _ = split_validation(train, config.validation_size)
    heldout = {p.text for p in [*folder.heldout_prompts(config), *exclude]}
    used = {str(r["prompt_id"]) for r in folder.read_samples()}
    pool = [p for p in train if p.text not in heldout]
    random.Random(derive_seed(config.seed, "fresh_pairs", "prompts")).shuffle(pool)
    return [p for p in pool if p.id not in used] + [p for p in pool if p.id in used]


def fresh_pairs(
    folder: RunFolder,
    config: SimsConfig,
    model: Any,
    tokenizer: Any,
    oracle: Any,
    n_pairs: int,
    exclude: Sequence[Prompt] = (),
) -> list[Pair]:
    """At least ``n_pairs`` pairs (when the prompts allow) chosen as the run chooses them, all sampled from pi_0.

    Rounds of ``prompts_per_iteration`` fresh prompts (:func:`fresh_prompts`), K samples each from
    the unsteered model, scored by ``oracle`` and paired by the run's ``pairs_per_prompt`` and
    ``margin``, until ``n_pairs`` pairs are found or the prompts run out.
    """
    prompts = fresh_prompts(folder, config, exclude)
    k, n = config.samples_per_prompt, config.prompts_per_iteration
    generation = GenerationSettings(config.max_new_tokens, config.temperature, config.top_p, config.batch_size, True)
    pairs: list[Pair] = []
    for round_, start in enumerate(range(0, len(prompts), n)):
        if len(pairs) >= n_pairs:
            break
        batch = prompts[start : start + n]
        ids = [encode_chat(tokenizer, p.text) for p in batch for _ in range(k)]
        exchanges = generate_cached(model, tokenizer, ids, generation, derive_seed(config.seed, "fresh_pairs", round_))
        responses = chunked([decode_response(tokenizer, ex) for ex in exchanges], k)
        scores = oracle.score([p.text for p in batch], responses)
        samples = [
            Sample(0, p.id, p.text, responses[i][j], exchanges[i * k + j], float(scores[i][j]), index=j)
            for i, p in enumerate(batch)
            for j in range(k)
        ]
        pairs += select_pairs(samples, pairs_per_prompt=config.pairs_per_prompt, margin=config.margin).pairs
    return pairs
