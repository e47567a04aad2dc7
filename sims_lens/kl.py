"""KL divergence of a policy from the base model, estimated from the policy's own samples.

SIMS's objective is a KL-regularised optimum, so a policy's place on the reward-versus-KL plane is
what says whether its reward was bought cheaply. For responses ``y ~ pi(. | x)``::

    KL(pi || pi_0) = E_y [ sum_i log pi(y_i | x, y_<i) - log pi_0(y_i | x, y_<i) ]

:func:`response_logprobs` scores each response token under the full softmax at the sampling
temperature. Top-p truncation is left out on purpose: under it pi_0 gives zero probability to
tokens the policy's nucleus holds, and the estimate would be infinite. So the value is the KL of
the temperature-scaled distributions (the sampler's top-p only trims their tails). It is an unbiased
estimate over samples of pi, and like every Monte-Carlo KL estimate it can come out below 0 on a
few samples.

Best-of-K has a known value, :func:`best_of_k_kl` (Beirami et al. 2024, an upper bound that is exact
when no two candidates tie).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from sims_lens.batching import AUTO, BatchSize, exchange_batch_size, run_in_batches
from sims_lens.chat import Exchange, left_pad
from sims_lens.plain_twin import hooked_forward, packed_weights
from sims_lens.steering.functions import SteeringSet
from sims_lens.steering.hooks import apply_steering
from sims_lens.steering.positions import track_positions


@torch.no_grad()
def response_logprobs(
    model: Any,
    exchanges: Sequence[Exchange],
    pad_id: int,
    temperature: float,
    *,
    steering: SteeringSet | None = None,
    batch_size: BatchSize = AUTO,
) -> Float[np.ndarray, " response"]:
    """Per response, ``sum_i log pi(y_i | x, y_<i)`` under ``model`` with ``steering`` on (None: unsteered).

    The batch is left-padded prompts, then the responses, under the same position tracking as
    generation, so a steering hook edits the positions it edited while sampling.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score log-probabilities, got {temperature!r}")
    device = next(model.parameters()).device
    out: list[float] = []
    active = apply_steering(model, steering) if steering is not None and len(steering) else nullcontext()
    batch = exchange_batch_size(model, batch_size, "nll", exchanges)

    def run(first: int, last: int) -> None:
        out.extend(_batch_logprobs(model, exchanges[first:last], pad_id, temperature, device))

    with active, packed_weights(model):
        run_in_batches(len(exchanges), batch, run, "log-probabilities")
    return np.asarray(out, dtype=float)


def _batch_logprobs(
    model: Any, chunk: Sequence[Exchange], pad_id: int, temperature: float, device: torch.device
) -> list[float]:
    width = max(len(ex.response_ids) for ex in chunk)
    if width == 0:
        return [0.0] * len(chunk)
    prompt_ids, prompt_mask = left_pad([ex.prompt_ids for ex in chunk], pad_id)
    responses = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    scored = torch.zeros((len(chunk), width), dtype=torch.bool)
    for row, ex in enumerate(chunk):
        n = len(ex.response_ids)
        responses[row, :n] = torch.tensor(ex.response_ids, dtype=torch.long)
        scored[row, :n] = True
    ids = torch.cat([prompt_ids, responses], dim=1).to(device)
    # right padding comes after every real token: causal attention never lets a real token read it
    mask = torch.cat([prompt_mask, torch.ones_like(responses)], dim=1).to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with track_positions(model, prompt_mask) as _, hooked_forward(model) as lm:
        logits = lm(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=width + 1
        ).logits
    # logits[:, j] (j < width) is the distribution of response token j
    logprobs = (logits[:, :-1].float() / temperature).log_softmax(-1)
    picked = logprobs.gather(-1, responses.to(device).unsqueeze(-1)).squeeze(-1).cpu()
    return (picked * scored).sum(-1).tolist()


def best_of_k_kl(k: int) -> float:
    """KL of Best-of-K sampling from the base model: ``log K - (K - 1) / K`` nats per answer."""
    if k < 1:
        raise ValueError(f"best-of-K needs K >= 1, got {k!r}")
    return math.log(k) - (k - 1) / k
