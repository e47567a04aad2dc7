"""The embedded SmolLM2-135M-Instruct inside TransformerBridge: numerics, caching, batching, spans."""

from __future__ import annotations

import pytest
import torch

from sims_lens.chat import encode_chat
from sims_lens.generation import GenerationSettings, generate_ids
from sims_lens.models import cached_folder_for, embedded_gguf_path

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Hi!",
    "Give me two tips for sleeping well.",
]


def test_bridge_logits_equal_hugging_face_logits(embedded):
    from transformers import AutoModelForCausalLM

    model, tok = embedded
    # A separate HF instance: booting rewires the bridged one in place. Eager attention, as the bridge uses.
    reference = AutoModelForCausalLM.from_pretrained(
        str(cached_folder_for(embedded_gguf_path())), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    for prompt in PROMPTS:
        ids = torch.tensor([encode_chat(tok, prompt)])
        with torch.no_grad():
            diff = (model(ids) - reference(ids).logits).abs().max().item()
        assert diff < 1e-4, f"{prompt!r}: max abs logit difference {diff}"


def test_greedy_with_kv_cache_equals_without(embedded):
    """Guards the transformers pin: 5.24 breaks TransformerLens 4.3's cached generation silently."""
    model, tok = embedded
    prompts = [encode_chat(tok, p) for p in PROMPTS]
    cached = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=24, use_kv_cache=True))
    uncached = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=24, use_kv_cache=False))
    assert cached == uncached
    assert all(len(ex.response_ids) > 3 for ex in cached)


def test_batched_greedy_equals_one_by_one(embedded):
    model, tok = embedded
    prompts = [encode_chat(tok, p) for p in PROMPTS]
    settings = GenerationSettings(max_new_tokens=24, batch_size=4)
    assert generate_ids(model, tok, prompts, settings) == [generate_ids(model, tok, [p], settings)[0] for p in prompts]


def test_response_span_is_exactly_the_generated_tokens(embedded):
    model, tok = embedded
    prompt = encode_chat(tok, PROMPTS[0])
    [ex] = generate_ids(model, tok, [prompt], GenerationSettings(max_new_tokens=16))
    full = model.generate(
        torch.tensor([prompt]), max_new_tokens=16, do_sample=False, verbose=False, return_type="tokens"
    )[0].tolist()
    start, end = ex.response_span
    assert tuple(full[:start]) == ex.prompt_ids
    assert tuple(full[start:end]) == ex.response_ids
    assert "Paris" in tok.decode(list(ex.response_ids))


def test_chat_prompt_has_a_single_leading_bos(embedded):
    _, tok = embedded
    ids = encode_chat(tok, "Hello")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[1] != ids[0]
