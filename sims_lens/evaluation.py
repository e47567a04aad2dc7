"""Held-out evaluation of a policy against the base model.

The same held-out prompts are sampled with the same seed under pi_0 and pi_t, so reward
differences are paired. Fluency cost is the perplexity of the policy's responses under the
*base* model (steered text that degrades into word salad gets a high perplexity), weighted by
tokens: every scored response token counts once, however long its response.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sims_lens.answer_cache import generate_cached, nll_cached
from sims_lens.batching import AUTO, BatchSize, exchange_batch_size, run_in_batches
from sims_lens.capture import padded_batches
from sims_lens.chat import Exchange, encode_chat
from sims_lens.generation import GenerationSettings, decode_response
from sims_lens.groups import chunked
from sims_lens.plain_twin import hooked_forward, packed_weights
from sims_lens.prompts import Prompt
from sims_lens.seeds import derive_seed
from sims_lens.stats import token_weighted_perplexity, win_outcomes
from sims_lens.steering.functions import SteeringSet
from sims_lens.steering.hooks import apply_steering


@dataclass
class Evaluation:
    """Responses to the held-out prompts (``samples_per_prompt`` each, prompt-major) and their scores."""

    prompt_ids: list[str]
    responses: list[str]
    exchanges: list[Exchange]
    rewards: list[float]
    nll: list[float]
    """Per response, the mean NLL of its tokens under the base model (:func:`response_nll`)."""
    reference_rewards: list[float] | None = None
    """Scores of a second (reference) oracle, when one is configured."""

    @property
    def reward_mean(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    @property
    def reference_reward_mean(self) -> float | None:
        if not self.reference_rewards:
            return None
        return sum(self.reference_rewards) / len(self.reference_rewards)

    def groups(self, samples_per_prompt: int) -> list[list[str]]:
        """The responses grouped by prompt (``samples_per_prompt`` each, prompt-major)."""
        return chunked(self.responses, samples_per_prompt)

    @property
    def perplexity(self) -> float:
        """Token-weighted perplexity: ``exp(sum_i nll_i * n_i / sum_i n_i)``.

        ``n_i`` is the number of tokens :func:`response_nll` scored in response i (all of its
        ``response_ids``, the end token included), so this is the exponent of the mean NLL over all
        response tokens pooled, not of the mean of per-response means (which would let a short
        response weigh as much as a long one). Responses with no tokens are skipped.
        """
        return token_weighted_perplexity(self.nll, [len(ex.response_ids) for ex in self.exchanges])

    @property
    def response_length(self) -> float:
        return sum(len(ex.response_ids) for ex in self.exchanges) / len(self.exchanges)


@torch.no_grad()
def response_nll(model: Any, exchanges: Sequence[Exchange], pad_id: int, batch_size: BatchSize = AUTO) -> list[float]:
    """Per response, the mean negative log-likelihood of its tokens under ``model`` (call it unsteered).

    Every token of ``response_ids`` is scored, the end token included when the response has one:
    the model's choice to stop is part of fluency. So ``len(response_ids)`` tokens are scored, the
    weight :attr:`Evaluation.perplexity` gives each response. The unsteered model's values are
    read back from the answer cache where it holds them (:mod:`sims_lens.answer_cache`).
    """
    return nll_cached(model, exchanges, pad_id, batch_size, lambda: _response_nll(model, exchanges, pad_id, batch_size))


def _response_nll(model: Any, exchanges: Sequence[Exchange], pad_id: int, batch_size: BatchSize) -> list[float]:
    device = next(model.parameters()).device
    out: list[float] = []

    def run(first: int, last: int) -> None:
        [(chunk, ids, kwargs)] = padded_batches(exchanges[first:last], pad_id, last - first, device)
        keep = 1 + max(len(ex.response_ids) for ex in chunk)  # logits of the positions that predict responses
        logprobs = lm(input_ids=ids, use_cache=False, logits_to_keep=keep, **kwargs).logits.float().log_softmax(-1)
        values = []
        for row, ex in enumerate(chunk):  # logprobs[:, j] predicts token width - keep + j + 1
            n = len(ex.response_ids)
            targets = ids[row, ids.shape[1] - n :]
            predicted = logprobs[row, keep - n - 1 : keep - 1]
            values.append(float(-predicted.gather(-1, targets.unsqueeze(-1)).mean()))
        out.extend(values)

    batch = exchange_batch_size(model, batch_size, "nll", exchanges)
    # the bridge's plain twin when no hook needs the bridge
    with packed_weights(model), hooked_forward(model) as lm:
        run_in_batches(len(exchanges), batch, run, "NLL")
    return out


def evaluate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    oracle: Any,
    settings: GenerationSettings,
    *,
    steering: SteeringSet | None = None,
    samples_per_prompt: int = 2,
    seed: int = 0,
    reference: Any = None,
) -> Evaluation:
    """Sample the policy (base model plus ``steering``) on held-out prompts and score it.

    Scoring runs with no steering active, so the judge is the same for every policy.
    """
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    ids = [encode_chat(tokenizer, p.text) for p in expanded]
    with apply_steering(model, steering) if steering is not None and len(steering) else nullcontext():
        exchanges = generate_cached(model, tokenizer, ids, settings, seed)  # the base model's: cached across runs
    responses = [decode_response(tokenizer, ex) for ex in exchanges]
    texts = [p.text for p in prompts]
    groups = chunked(responses, samples_per_prompt)
    rewards = [float(s) for group in oracle.score(texts, groups) for s in group]
    reference_rewards = (
        [float(s) for group in reference.score(texts, groups) for s in group] if reference is not None else None
    )
    nll = response_nll(model, exchanges, int(tokenizer.pad_token_id), settings.batch_size)
    return Evaluation([p.id for p in expanded], responses, exchanges, rewards, nll, reference_rewards)


def head_to_head(
    oracle: Any, prompts: Sequence[Prompt], policy: Evaluation, base: Evaluation, samples_per_prompt: int
) -> float:
    """Win rate of the policy over the base model, scored in one group per prompt.

    Each prompt's base and policy responses are ranked together, so the comparison is meaningful
    for relative oracles (the self-judge's Copeland or Bradley-Terry scores sum to zero within a
    group) as well as absolute ones (for VADER it equals comparing the separate scores).
    """
    k = samples_per_prompt
    joint = [b + p for b, p in zip(base.groups(k), policy.groups(k), strict=True)]
    scores = oracle.score([p.text for p in prompts], joint)
    return pooled_win_rate([s for g in scores for s in g[k:]], [s for g in scores for s in g[:k]])


def heldout_seed(seed: int) -> int:
    """The sampling seed of held-out evaluation: the same for pi_0 and every pi_t, so samples are paired."""
    return derive_seed(seed, "heldout")


def pooled_win_rate(policy: Sequence[float], base: Sequence[float]) -> float:
    """Fraction of all paired samples where the policy's reward beats the base's (ties count half).

    Pooled over every pair; :func:`sims_lens.stats.prompt_mean_win_rate` averages per-prompt fractions.
    """
    if len(policy) != len(base) or not policy:
        raise ValueError("win rate needs the same, non-zero number of policy and base rewards")
    return float(np.nanmean(win_outcomes(policy, base)))
