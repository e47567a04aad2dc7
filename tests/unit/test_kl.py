"""The KL estimator against exact values on a tiny model with a planted edit, and Best-of-K's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sims_lens.chat import Exchange, encode_chat
from sims_lens.evaluation import _response_nll
from sims_lens.generation import GenerationSettings, generate_ids
from sims_lens.kl import best_of_k_kl, response_logprobs
from sims_lens.steering.functions import SteeringFunction, SteeringSet


def _planted(d_model: int, positions: str = "all", scale: float = 4.0) -> SteeringSet:
    vector = torch.randn(d_model, generator=torch.Generator().manual_seed(3)) * scale
    edit = SteeringFunction("add", "blocks.1.hook_resid_post", {"vector": vector})
    return SteeringSet.from_functions([edit], positions=positions)


def test_logprobs_match_the_nll_of_the_base_model(tiny):
    """At temperature 1 and unsteered, the summed log-probabilities are minus the summed NLL the eval scores."""
    model, tokenizer = tiny
    prompts = [encode_chat(tokenizer, text) for text in ("hello there", "a longer prompt than that one")]
    exchanges = generate_ids(model, tokenizer, prompts * 2, GenerationSettings(6, 1.0, 1.0, 4, True), seed=1)
    logprobs = response_logprobs(model, exchanges, int(tokenizer.pad_token_id), 1.0, batch_size=3)
    with torch.no_grad():
        nll = _response_nll(model, exchanges, int(tokenizer.pad_token_id), 4)
    expected = [-m * len(ex.response_ids) for m, ex in zip(nll, exchanges, strict=True)]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("temperature", "positions"), [(1.0, "all"), (0.7, "generated")])
def test_exact_kl_of_one_token_answers(tiny, temperature, positions):
    """Enumerating every one-token answer: sum_v pi(v) (log pi(v) - log pi_0(v)) is the exact KL of the
    next-token distributions read off the logits directly."""
    model, tokenizer = tiny
    steering = _planted(int(model.cfg.d_model), positions)
    prompt = tuple(encode_chat(tokenizer, "what is the weather like"))
    vocab = int(model.cfg.d_vocab)
    exchanges = [Exchange(prompt, (v,)) for v in range(vocab)]
    pad = int(tokenizer.pad_token_id)
    policy = response_logprobs(model, exchanges, pad, temperature, steering=steering, batch_size=128)
    base = response_logprobs(model, exchanges, pad, temperature, batch_size=128)
    estimated = float(np.sum(np.exp(policy) * (policy - base)))

    ids = torch.tensor([prompt])
    with torch.no_grad():
        q = (model(ids)[0, -1].float() / temperature).log_softmax(-1)
        with steering.apply(model):
            p = (model(ids)[0, -1].float() / temperature).log_softmax(-1)
    exact = float((p.exp() * (p - q)).sum())
    assert exact > 0.01  # the planted edit moves the distribution
    assert np.exp(policy).sum() == pytest.approx(1.0, abs=1e-4)
    assert estimated == pytest.approx(exact, rel=1e-3, abs=1e-5)


def test_sampled_estimate_is_unbiased_for_the_sampler(tiny):
    """Averaged over the policy's own (top_p = 1) samples, the estimate meets the exact KL within its error."""
    model, tokenizer = tiny
    steering = _planted(int(model.cfg.d_model))
    prompt = encode_chat(tokenizer, "tell me a story")
    pad = int(tokenizer.pad_token_id)
    settings = GenerationSettings(1, 1.0, 1.0, 256, True)
    with steering.apply(model):
        exchanges = generate_ids(model, tokenizer, [prompt] * 1500, settings, seed=5)
    per_response = response_logprobs(model, exchanges, pad, 1.0, steering=steering, batch_size=256) - (
        response_logprobs(model, exchanges, pad, 1.0, batch_size=256)
    )
    ids = torch.tensor([prompt])
    with torch.no_grad():
        q = model(ids)[0, -1].float().log_softmax(-1)
        with steering.apply(model):
            p = model(ids)[0, -1].float().log_softmax(-1)
    exact = float((p.exp() * (p - q)).sum())
    error = per_response.std() / math.sqrt(len(per_response))
    assert abs(per_response.mean() - exact) < 4 * error


def test_no_edit_means_zero_kl(tiny):
    model, tokenizer = tiny
    exchanges = generate_ids(model, tokenizer, [encode_chat(tokenizer, "hi")] * 3, GenerationSettings(5, 1.0), seed=2)
    pad = int(tokenizer.pad_token_id)
    zero = _planted(int(model.cfg.d_model)).scaled(0.0)
    np.testing.assert_allclose(
        response_logprobs(model, exchanges, pad, 1.0, steering=zero), response_logprobs(model, exchanges, pad, 1.0)
    )


def test_best_of_k_formula():
    assert best_of_k_kl(1) == 0.0
    assert best_of_k_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_k_kl(4) == pytest.approx(1.3862944 - 0.75)
    with pytest.raises(ValueError, match="K >= 1"):
        best_of_k_kl(0)
    with pytest.raises(ValueError, match="temperature"):
        response_logprobs(None, [], 0, 0.0)


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_padding_does_not_change_the_scores(tiny, positions):
    """Prompts and responses of different lengths score the same one at a time as batched (padded)."""
    model, tokenizer = tiny
    steering = _planted(int(model.cfg.d_model), positions)
    prompts = [encode_chat(tokenizer, text) for text in ("hi", "a much longer prompt with many words in it", "ok")]
    with steering.apply(model):
        exchanges = generate_ids(model, tokenizer, prompts, GenerationSettings(8, 1.0, 1.0, 4, True), seed=4)
    pad = int(tokenizer.pad_token_id)
    batched = response_logprobs(model, exchanges, pad, 1.0, steering=steering, batch_size=3)
    alone = response_logprobs(model, exchanges, pad, 1.0, steering=steering, batch_size=1)
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-4)
