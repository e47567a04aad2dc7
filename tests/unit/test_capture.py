"""Capture of response-token activations (``sims_lens/capture.py``): which tokens count (never the
prompt, the padding or a trailing end token), the mean and last reductions, HPR's token pairs, batches,
and the one-pass capture of tokens at steered hooks with means at observed ones."""

from __future__ import annotations

import pytest
import torch

from sims_lens.capture import (
    capture,
    capture_activations,
    capture_tokens,
    captured_length,
    padded_batches,
    padded_forward_kwargs,
    pair_tokens,
    reduce_tokens,
)
from sims_lens.chat import Exchange, encode_chat, end_token_ids, left_pad
from sims_lens.plain_twin import plain_twin

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
EVERY = [f"blocks.{layer}.hook_resid_post" for layer in range(4)]


# ---------------------------------------------------------------- which tokens are captured


def test_capture_uses_only_response_tokens_and_never_padding(tiny):
    model, tok = tiny
    exchanges = [
        Exchange(tuple(encode_chat(tok, "Hi")), (50, 60, 70)),
        Exchange(tuple(encode_chat(tok, "Tell me a long story about the sea")), (80, 90)),
        Exchange(tuple(encode_chat(tok, "Why?")), (11, 12, 13, 14, 15)),
    ]
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    captured = reduce_tokens(capture_tokens(model, exchanges, hooks, tok.pad_token_id, batch_size=3), "mean")
    ids, mask = left_pad([ex.ids for ex in exchanges], tok.pad_token_id)
    _, cache = model.run_with_cache(ids, **padded_forward_kwargs(mask))
    width = ids.shape[1]
    for row, ex in enumerate(exchanges):
        start = width - len(ex.response_ids)
        for j, hook in enumerate(hooks):
            expected = cache[hook][row, start:].mean(0)
            torch.testing.assert_close(captured[row, j], expected, atol=1e-5, rtol=1e-5)
        # and the same sample alone (no padding) gives the same activations
        alone = reduce_tokens(capture_tokens(model, [ex], hooks, tok.pad_token_id), "mean")
        torch.testing.assert_close(captured[row], alone[0], atol=1e-4, rtol=1e-4)


def test_captured_length_drops_only_trailing_end_tokens():
    assert captured_length((5, 6, 2), [2]) == 2
    assert captured_length((5, 6, 7), [2]) == 3  # truncated: nothing to drop
    assert captured_length((5, 2, 7), [2]) == 3  # an end token inside is content
    assert captured_length((5, 7, 2), [2, 7]) == 1
    assert captured_length((2,), [2]) == 1  # an empty answer keeps its one token
    assert captured_length((2, 7), [2, 7]) == 1
    assert captured_length((5, 6, 2), []) == 3  # no end ids: everything, as before


def test_capture_excludes_the_end_token(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    ends = end_token_ids(tok)
    exchanges = [
        Exchange(tuple(encode_chat(tok, "Hi")), (50, 60, eos)),  # finished
        Exchange(tuple(encode_chat(tok, "Tell me a long story about the sea")), (80, 90, 95)),  # truncated
        Exchange(tuple(encode_chat(tok, "Why?")), (eos,)),  # an empty answer
    ]
    captured = capture_tokens(model, exchanges, HOOKS, tok.pad_token_id, batch_size=3, end_ids=ends)
    everything = capture_tokens(model, exchanges, HOOKS, tok.pad_token_id, batch_size=3)
    assert [len(t) for t in captured] == [2, 3, 1]
    assert [len(t) for t in everything] == [3, 3, 1]

    ids, mask = left_pad([ex.ids for ex in exchanges], tok.pad_token_id)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, **padded_forward_kwargs(mask))
    width = ids.shape[1]
    expected = torch.stack([cache[h] for h in HOOKS], dim=2)
    # the finished response: its content tokens only
    torch.testing.assert_close(captured[0], expected[0, width - 3 : width - 1], atol=1e-5, rtol=1e-5)
    # the truncated response: unchanged
    torch.testing.assert_close(captured[1], everything[1])
    torch.testing.assert_close(captured[1], expected[1, width - 3 :], atol=1e-5, rtol=1e-5)
    # the empty answer keeps its one token
    torch.testing.assert_close(captured[2], expected[2, width - 1 :], atol=1e-5, rtol=1e-5)
    # the last reduction reads the last content token of a finished response, not its end token
    last = reduce_tokens(captured, "last")
    torch.testing.assert_close(last[0], expected[0, width - 2], atol=1e-5, rtol=1e-5)

    # the content tokens' activations are those of the response without its end token (causal attention)
    [content] = capture_tokens(model, [Exchange(exchanges[0].prompt_ids, (50, 60))], HOOKS, tok.pad_token_id)
    torch.testing.assert_close(captured[0], content, atol=1e-4, rtol=1e-4)


def test_padded_forward_kwargs_count_positions_from_the_first_real_token():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    kwargs = padded_forward_kwargs(mask)
    assert kwargs["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert kwargs["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_padded_batches_pad_each_batch_to_its_own_width():
    exchanges = [Exchange((1,), (2, 3)), Exchange((1, 4), (5,)), Exchange((1,), (2, 3, 4, 5))]
    batches = list(padded_batches(exchanges, 0, 2, torch.device("cpu")))
    assert [list(chunk) for chunk, _, _ in batches] == [exchanges[:2], exchanges[2:]]
    assert batches[0][1].tolist() == [[1, 2, 3], [1, 4, 5]]
    assert batches[1][1].tolist() == [[1, 2, 3, 4, 5]]
    assert batches[1][2]["position_ids"].tolist() == [[0, 1, 2, 3, 4]]


# ---------------------------------------------------------------- reductions and token pairs


def test_mean_and_last_reductions_by_hand():
    a = torch.arange(12.0).reshape(3, 2, 2)  # 3 tokens, 2 hooks, d_model 2
    b = torch.tensor([[[1.0, -1.0], [2.0, 4.0]]])  # 1 token
    mean = reduce_tokens([a, b], "mean")
    assert mean.shape == (2, 2, 2)
    assert mean[0].tolist() == [[4.0, 5.0], [6.0, 7.0]]  # tokens [0, 1], [4, 5], [8, 9] at hook 0, ...
    assert mean[1].tolist() == [[1.0, -1.0], [2.0, 4.0]]
    assert reduce_tokens([a, b], "last").tolist() == [[[8.0, 9.0], [10.0, 11.0]], [[1.0, -1.0], [2.0, 4.0]]]
    with pytest.raises(ValueError, match=r"unknown reduction 'max'; use one of \['mean', 'last'\]"):
        reduce_tokens([a], "max")


def _tokens(n: int, base: float) -> torch.Tensor:
    """n tokens at one hook, d_model 2: token i is (base + i, -(base + i))."""
    values = base + torch.arange(float(n))
    return torch.stack([values, -values], dim=-1).unsqueeze(1)


def test_pair_tokens_pairs_position_by_position_up_to_the_shorter_response():
    pos, neg = [_tokens(3, 10), _tokens(1, 20)], [_tokens(2, 30), _tokens(4, 40)]
    paired_pos, paired_neg = pair_tokens(pos, neg)
    # pair 0: tokens 0, 1 of each (y- has 2); pair 1: token 0 of each (y+ has 1)
    assert paired_pos.shape == paired_neg.shape == (3, 1, 2)
    assert paired_pos[:, 0, 0].tolist() == [10.0, 11.0, 20.0]
    assert paired_neg[:, 0, 0].tolist() == [30.0, 31.0, 40.0]
    assert paired_neg[:, 0, 1].tolist() == [-30.0, -31.0, -40.0]
    with pytest.raises(ValueError, match=r"as many positive as negative samples \(2 vs 1\)"):
        pair_tokens(pos, neg[:1])


def test_capture_is_the_reduced_token_capture(tiny):
    model, tok = tiny
    exchanges, ends = _short(tok), end_token_ids(tok)
    tokens = capture_tokens(model, exchanges, HOOKS, tok.pad_token_id, batch_size=2, end_ids=ends)
    for reduction in ("mean", "last"):
        reduced = capture(model, exchanges, HOOKS, tok.pad_token_id, reduction, batch_size=2, end_ids=ends)
        assert reduced.shape == (len(exchanges), 2, 64) and reduced.dtype == torch.float32
        torch.testing.assert_close(reduced, reduce_tokens(tokens, reduction), rtol=0, atol=0)


# ---------------------------------------------------------------- batches


def _short(tok) -> list[Exchange]:
    """Five samples of different prompt and response lengths, finished and truncated."""
    eos = tok.eos_token_id
    prompts = ["Hi", "Tell me a long story about the sea", "Why?", "Explain gravity to me", "Ok"]
    responses = [(50, 60, eos), (80, 90, 95), (eos,), (11, 12, 13, 14, 15, 16), (70, eos)]
    return [Exchange(tuple(encode_chat(tok, p)), r) for p, r in zip(prompts, responses, strict=True)]


def test_capture_does_not_depend_on_the_batch_size(tiny):
    """Padding changes with the batch; the captured tokens do not (and every batch is reported)."""
    model, tok = tiny
    exchanges, ends, pad = _short(tok), end_token_ids(tok), tok.pad_token_id
    reference = capture_tokens(model, exchanges, HOOKS, pad, batch_size=1, end_ids=ends)
    assert [len(t) for t in reference] == [2, 3, 1, 6, 1]
    for size, chunks in [(2, [2, 2, 1]), (3, [3, 2]), (16, [5])]:
        seen: list[int] = []
        got = capture_tokens(model, exchanges, HOOKS, pad, batch_size=size, on_batch=seen.append, end_ids=ends)
        assert seen == chunks
        for a, b in zip(got, reference, strict=True):
            assert a.shape == b.shape and a.dtype == torch.float32 and a.device.type == "cpu"
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- one pass: tokens at hooks, means at mean_hooks


def _exchanges(tok) -> list[Exchange]:
    eos = tok.eos_token_id
    return [
        Exchange(tuple(encode_chat(tok, "Hi")), (50, 60, eos)),  # finished: its end token is left out
        Exchange(tuple(encode_chat(tok, "Tell me a long story about the sea")), (80, 90, 95)),  # truncated
        Exchange(tuple(encode_chat(tok, "Why?")), (eos,)),  # an empty answer keeps its one token
    ]


def test_capture_stops_after_the_deepest_layer_it_needs(tiny4):
    """Layers above the captured ones and the unembedding never run (the capture's speed-up)."""
    model, tok = tiny4
    fired: list[str] = []
    sites = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre", "blocks.3.hook_resid_post", "unembed.hook_out"]
    with model.hooks(fwd_hooks=[(name, lambda act, hook, name=name: fired.append(name)) for name in sites]):
        captured = capture_activations(
            model, _exchanges(tok), ["blocks.1.hook_resid_post"], tok.pad_token_id, end_ids=end_token_ids(tok)
        )
    assert set(fired) == {"blocks.1.hook_resid_post"}
    full = capture_tokens(
        model, _exchanges(tok), ["blocks.1.hook_resid_post"], tok.pad_token_id, end_ids=end_token_ids(tok)
    )
    assert all(torch.equal(a, b) for a, b in zip(captured.tokens, full, strict=True))


def test_capture_runs_through_the_plain_twin(tiny4):
    """The capture forwards run on the bridge's plain twin (no per-layer bridge wrapping), one per batch."""
    model, tok = tiny4
    twin = plain_twin(model)
    assert twin is not None
    calls: list[int] = []
    handle = twin.module.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        capture_activations(
            model, _exchanges(tok), ["blocks.1.hook_resid_post"], tok.pad_token_id, batch_size=2, mean_hooks=EVERY
        )
    finally:
        handle.remove()
    assert calls == [1, 1]


def test_observed_means_are_the_per_token_capture_averaged_in_the_same_pass(tiny4, monkeypatch):
    model, tok = tiny4
    ends, pad = end_token_ids(tok), tok.pad_token_id
    exchanges = _exchanges(tok)
    steered = ["blocks.2.hook_resid_post"]
    forwards: list[int] = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda act, hook: forwards.append(act.shape[0]))]):
        captured = capture_activations(model, exchanges, steered, pad, batch_size=2, end_ids=ends, mean_hooks=EVERY)
    assert forwards == [2, 1]  # one forward pass per batch serves the steered and every observed layer

    assert captured.means.shape == (3, 4, 64) and captured.means.dtype == torch.float32
    per_token = capture_tokens(model, exchanges, EVERY, pad, batch_size=2, end_ids=ends)
    assert [len(t) for t in per_token] == [2, 3, 1]  # the same spans: end tokens out, an empty answer kept
    torch.testing.assert_close(captured.means, reduce_tokens(per_token, "mean"), atol=1e-5, rtol=1e-5)

    # the steered hook: the learner's tokens are unchanged by observing, and its mean is theirs (captured once)
    alone = capture_tokens(model, exchanges, steered, pad, batch_size=2, end_ids=ends)
    assert [tuple(t.shape) for t in captured.tokens] == [(2, 1, 64), (3, 1, 64), (1, 1, 64)]
    assert all(torch.equal(a, b) for a, b in zip(captured.tokens, alone, strict=True))
    assert torch.equal(captured.means[:, 2], reduce_tokens(captured.tokens, "mean")[:, 0])

    # observing without steered hooks keeps no tokens; another batch size only changes the padding
    only = capture_activations(model, exchanges, [], pad, batch_size=3, end_ids=ends, mean_hooks=EVERY)
    assert [tuple(t.shape) for t in only.tokens] == [(2, 0, 64), (3, 0, 64), (1, 0, 64)]
    torch.testing.assert_close(only.means, captured.means, atol=1e-4, rtol=1e-4)

    nothing = capture_activations(model, exchanges, steered, pad, end_ids=ends)
    assert nothing.means.shape == (3, 0, 64)
    with pytest.raises(ValueError, match="at least one hook point"):
        capture_activations(model, exchanges, [], pad)


def test_the_means_follow_the_order_of_mean_hooks_whichever_hooks_are_kept(tiny4):
    model, tok = tiny4
    exchanges, ends, pad = _exchanges(tok), end_token_ids(tok), tok.pad_token_id
    hooks = ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post"]
    observed = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    captured = capture_activations(model, exchanges, hooks, pad, batch_size=2, end_ids=ends, mean_hooks=observed)
    token_means = reduce_tokens(captured.tokens, "mean")
    # the tokens are in the order of hooks, the means in the order of mean_hooks
    for j, hook in enumerate(hooks):
        [alone] = [t[:, 0] for t in capture_tokens(model, exchanges[:1], [hook], pad, end_ids=ends)]
        torch.testing.assert_close(captured.tokens[0][:, j], alone, atol=1e-4, rtol=1e-4)
    assert torch.equal(captured.means[:, 0], token_means[:, 1])  # blocks.0: kept tokens, second hook
    assert torch.equal(captured.means[:, 2], token_means[:, 0])  # blocks.2: kept tokens, first hook
    middle = reduce_tokens(capture_tokens(model, exchanges, observed[1:2], pad, batch_size=2, end_ids=ends), "mean")
    torch.testing.assert_close(captured.means[:, 1], middle[:, 0], atol=1e-5, rtol=1e-5)


def test_the_deepest_observed_layer_decides_where_the_forward_stops(tiny4):
    model, tok = tiny4
    fired: list[str] = []
    sites = ["blocks.2.hook_resid_post", "blocks.3.hook_resid_pre", "unembed.hook_out"]
    with model.hooks(fwd_hooks=[(name, lambda act, hook, name=name: fired.append(name)) for name in sites]):
        capture_activations(
            model, _exchanges(tok), ["blocks.0.hook_resid_post"], tok.pad_token_id, mean_hooks=EVERY[2:3]
        )
    assert set(fired) == {"blocks.2.hook_resid_post"}


def test_a_hook_outside_the_blocks_keeps_the_whole_forward(tiny):
    model, tok = tiny
    exchanges = _short(tok)[:2]
    [first, _] = capture_tokens(model, exchanges, ["hook_embed", "ln_final.hook_normalized"], tok.pad_token_id)
    ids, mask = left_pad([ex.ids for ex in exchanges], tok.pad_token_id)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, **padded_forward_kwargs(mask))
    n = len(exchanges[0].response_ids)
    torch.testing.assert_close(first[:, 0], cache["hook_embed"][0, -n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first[:, 1], cache["ln_final.hook_normalized"][0, -n:], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- errors


def test_an_empty_response_is_a_clear_error(tiny):
    model, tok = tiny
    exchanges = [Exchange(tuple(encode_chat(tok, "Hi")), (50,)), Exchange(tuple(encode_chat(tok, "Why?")), ())]
    with pytest.raises(ValueError, match="sample 1 has an empty response"):
        capture_tokens(model, exchanges, HOOKS, tok.pad_token_id)
    with pytest.raises(ValueError, match="sample 1 has an empty response"):
        capture_activations(model, exchanges, [], tok.pad_token_id, mean_hooks=HOOKS)


def test_capture_needs_a_hook_point(tiny):
    model, tok = tiny
    exchanges = _short(tok)[:1]
    with pytest.raises(ValueError, match="at least one hook point"):
        capture_tokens(model, exchanges, [], tok.pad_token_id)
    with pytest.raises(ValueError, match="at least one hook point"):
        capture_activations(model, exchanges, [], tok.pad_token_id, mean_hooks=[])
