"""Applying steering as TransformerLens hooks: removal, positions, padding, KV cache, multipliers."""

from __future__ import annotations

import pytest
import torch

from sims_lens.chat import encode_chat, left_pad
from sims_lens.generation import GenerationSettings, generate_ids
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.hooks import active_hook_count, apply_steering, attach
from sims_lens.steering.positions import track_positions

HOOK = "blocks.0.hook_resid_post"
PROMPTS = ["Hi", "Tell me a story about the sea please", "What is 2+2?"]


def vector_set(d_model: int, scale: float = 5.0, seed: int = 0, hook: str = HOOK) -> SteeringSet:
    g = torch.Generator().manual_seed(seed)
    return SteeringSet.from_functions(
        [SteeringFunction("add", hook, {"vector": scale * torch.randn(d_model, generator=g)})]
    )


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw)


def test_steering_changes_logits_and_hooks_are_removed(tiny):
    model, tok = tiny
    ids = torch.tensor([encode_chat(tok, "Hi")])
    before = logits(model, ids)
    assert active_hook_count(model) == 0
    with apply_steering(model, vector_set(64)):
        assert active_hook_count(model) > 0
        steered = logits(model, ids)
    assert active_hook_count(model) == 0
    assert (steered - before).abs().max() > 1e-2
    assert torch.equal(logits(model, ids), before)


def test_hooks_are_removed_after_an_exception(tiny):
    model, _ = tiny
    with pytest.raises(RuntimeError, match="boom"), apply_steering(model, vector_set(64)):
        raise RuntimeError("boom")
    assert active_hook_count(model) == 0


@pytest.mark.parametrize("make", [lambda d: vector_set(d, scale=0.0), lambda d: vector_set(d).scaled(0.0)])
def test_zero_vector_or_zero_multiplier_is_the_identity(tiny, make):
    model, tok = tiny
    ids = torch.tensor([encode_chat(tok, "Hi")])
    with apply_steering(model, make(64)):
        steered = logits(model, ids)
    assert torch.equal(steered, logits(model, ids))


def test_attach_and_detach(tiny):
    model, tok = tiny
    ids = torch.tensor([encode_chat(tok, "Hi")])
    before = logits(model, ids)
    handle = attach(model, vector_set(64))
    try:
        model.reset_hooks()  # permanent hooks survive a reset
        assert not torch.equal(logits(model, ids), before)
    finally:
        handle.detach()
    handle.detach()  # idempotent
    assert torch.equal(logits(model, ids), before)
    assert active_hook_count(model) == 0


def test_unknown_hook_or_layer_is_refused(tiny):
    model, _ = tiny
    with (
        pytest.raises(ValueError, match="layer 7"),
        apply_steering(model, vector_set(64, hook="blocks.7.hook_resid_post")),
    ):
        pass
    with (
        pytest.raises(ValueError, match="unknown hook point"),
        apply_steering(model, vector_set(64, hook="blocks.0.hook_nope")),
    ):
        pass
    with pytest.raises(ValueError, match="position policy"), apply_steering(model, vector_set(64), positions="late"):
        pass


def test_left_padding_is_never_steered(tiny):
    model, tok = tiny
    a, b = encode_chat(tok, "Hi"), encode_chat(tok, "Tell me a story about the sea please")
    ids, mask = left_pad([a, b], tok.pad_token_id)
    seen: list[torch.Tensor] = []

    def record(act, hook):
        seen.append(act.detach().clone())

    steering = vector_set(64)
    with track_positions(model, mask), apply_steering(model, steering), model.hooks(fwd_hooks=[(HOOK, record)]):
        model(ids, attention_mask=mask)
    with track_positions(model, mask), model.hooks(fwd_hooks=[(HOOK, record)]):
        model(ids, attention_mask=mask)
    steered, plain = seen
    pad = mask == 0
    assert torch.equal(steered[pad], plain[pad])
    assert not torch.allclose(steered[~pad], plain[~pad])


@pytest.mark.parametrize("policy", ["all", "generated", "prompt", "from:3"])
def test_steered_generation_is_the_same_batched_cached_or_not(tiny, policy):
    model, tok = tiny
    prompts = [encode_chat(tok, p) for p in PROMPTS]
    with apply_steering(model, vector_set(64, scale=3.0), positions=policy):
        batched = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=6, batch_size=3))
        single = [generate_ids(model, tok, [p], GenerationSettings(max_new_tokens=6))[0] for p in prompts]
        uncached = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=6, use_kv_cache=False))
    assert batched == single == uncached


def test_generated_policy_leaves_prompt_logits_alone(tiny):
    model, tok = tiny
    ids = torch.tensor([encode_chat(tok, "Hi")])
    with apply_steering(model, vector_set(64), positions="generated"):
        steered = logits(model, ids)
    assert torch.equal(steered, logits(model, ids))


def test_from_position_counts_from_the_first_real_token(tiny):
    model, tok = tiny
    ids = torch.tensor([encode_chat(tok, "Tell me a story")])
    with apply_steering(model, vector_set(64), positions="from:4"):
        steered = logits(model, ids)
    plain = logits(model, ids)
    assert torch.equal(steered[0, :4], plain[0, :4])
    assert not torch.allclose(steered[0, 4:], plain[0, 4:])


def test_multiplier_scales_the_edit(tiny):
    model, tok = tiny
    ids = torch.tensor([encode_chat(tok, "Hi")])
    record: list[torch.Tensor] = []
    steering = vector_set(64)
    for m in (1.0, 2.0):
        with (
            apply_steering(model, steering, multiplier=m),
            model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: record.append(act.clone()))]),
        ):
            logits(model, ids)
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: record.append(act.clone()))]):
        logits(model, ids)
    one, two, base = record
    torch.testing.assert_close(two - base, 2 * (one - base), atol=1e-4, rtol=1e-4)
