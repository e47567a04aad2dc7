"""Applying steering as TransformerLens hooks: removal, positions, padding, KV cache, multipliers."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from sims_lens.chat import encode_chat, left_pad
from sims_lens.generation import GenerationSettings, generate_ids
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.hooks import active_hook_count, apply_steering, attach
from sims_lens.steering.positions import PositionTracker, position_mask, track_positions

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


@pytest.mark.parametrize("policy", ["all", "generated", "prompt", "from:2"])
def test_left_padding_is_never_steered(tiny, policy):
    model, tok = tiny
    a, b = encode_chat(tok, "Hi"), encode_chat(tok, "Tell me a story about the sea please")
    ids, mask = left_pad([a, b], tok.pad_token_id)
    seen: list[torch.Tensor] = []

    def record(act, hook):
        seen.append(act.detach().clone())

    steering = vector_set(64)
    with (
        track_positions(model, mask),
        apply_steering(model, steering, positions=policy),
        model.hooks(fwd_hooks=[(HOOK, record)]),
    ):
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


def test_generated_policy_steers_only_the_last_token_of_a_plain_forward(tiny):
    model, tok = tiny
    ids = torch.tensor([encode_chat(tok, "Hi")])
    with apply_steering(model, vector_set(64), positions="generated"):
        steered = logits(model, ids)
    plain = logits(model, ids)
    assert torch.equal(steered[0, :-1], plain[0, :-1])
    assert not torch.allclose(steered[0, -1], plain[0, -1])


def test_generated_policy_steers_the_first_response_token_and_no_earlier_prompt_position(tiny):
    """The prefill of a left-padded generation: only the last prompt token of each row is edited,
    so the first generated token's logits change and no earlier prompt position's do.

    Padding is compared at the steered hook, not in the logits: a padding query has no real key to
    attend to, and transformers then lets it attend to every position, so its (unused) logits see
    the steered last token.
    """
    model, tok = tiny
    ids, mask = left_pad([encode_chat(tok, p) for p in PROMPTS], tok.pad_token_id)
    seen: list[torch.Tensor] = []

    def record(act, hook):
        seen.append(act.detach().clone())

    def steered_if(steer: bool):
        return apply_steering(model, vector_set(64), positions="generated") if steer else nullcontext()

    outputs = []
    for steer in (True, False):  # the recording hook runs after the steering hook
        with track_positions(model, mask), steered_if(steer), model.hooks(fwd_hooks=[(HOOK, record)]):
            outputs.append(logits(model, ids, attention_mask=mask))
    steered, plain = outputs
    # the logits the first response token is drawn from differ in every row...
    for row in range(len(PROMPTS)):
        assert not torch.allclose(steered[row, -1], plain[row, -1])
    # ...while every earlier real prompt position is untouched (steering is causal)
    earlier = mask.bool().clone()
    earlier[:, -1] = False
    assert torch.equal(steered[earlier], plain[earlier])
    # at the steered hook only the last column changed: padding and earlier prompt tokens are left alone
    steered_act, plain_act = seen
    assert torch.equal(steered_act[:, :-1], plain_act[:, :-1])
    assert not torch.allclose(steered_act[:, -1], plain_act[:, -1])

    # and through generate: the first generated token's logits differ from the unsteered ones
    first = []
    for steer in (True, False):
        with track_positions(model, mask), steered_if(steer):
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=1,
                do_sample=False,
                verbose=False,
                output_logits=True,
                return_type="tokens",
            )
        first.append(out.logits[0])
    torch.testing.assert_close(first[1], plain[:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first[0], steered[:, -1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(first[0], first[1])


def test_generated_policy_masks_through_prefill_decode_and_uncached_reruns():
    """Prefill: the last prompt column; cached decode steps: the new token; a full re-run: both; never padding."""
    cpu = torch.device("cpu")
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])  # the last row's prompt is empty
    tracker = PositionTracker(prompt_mask)
    tracker.advance(4)  # prefill
    prefill = position_mask("generated", 3, 4, tracker, cpu)
    assert prefill is not None
    assert prefill.tolist() == [[False, False, False, True], [False, False, False, True], [False] * 4]
    tracker.advance(1)  # a cached decode step: every row's new token
    assert position_mask("generated", 3, 1, tracker, cpu) is None
    tracker.advance(6)  # an uncached re-run over the prompt and two generated tokens
    rerun = position_mask("generated", 3, 6, tracker, cpu)
    assert rerun is not None
    assert rerun.tolist() == [
        [False, False, False, True, True, True],
        [False, False, False, True, True, True],
        [False, False, False, False, True, True],
    ]
    untracked = position_mask("generated", 2, 3, None, cpu)
    assert untracked is not None and untracked.tolist() == [[False, False, True]] * 2


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
