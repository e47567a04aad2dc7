"""The sampler's fast paths give the simple path's results, and its choices match Hugging Face's.

Fast paths: batching with length sorting, one prefill of the prefix all prompts share, one
prefill shared by identical prompts, ended rows leaving the batch, the KV cache, prepacked weights.
The simple path: one row per batch, no cache, plain ``F.linear``.
"""

from __future__ import annotations

import pytest
import torch

from sims_lens.chat import encode_chat, end_token_ids
from sims_lens.generation import (
    GenerationSettings,
    batch_order,
    choose_tokens,
    generate_ids,
    prefix_first_pad,
    shared_prefix_length,
)
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.hooks import apply_steering
from sims_lens.tiny import tiny_hf_model

PROMPTS = ["Hi", "Tell me a story about the sea please", "What is 2+2?", "Write a short poem", "Hi"]


def eos_bias(tok, bias: float):
    """A hook that makes the end token likelier, so rows end at different steps."""
    eos = end_token_ids(tok)

    def hook(act, hook):
        act[..., eos] += bias
        return act

    return ("unembed.hook_out", hook)


@pytest.mark.parametrize(("temperature", "bias"), [(0.0, 0.8), (1.0, 5.0)])
def test_batched_shared_and_cached_equal_one_row_uncached(tiny, temperature, bias):
    """K samples per prompt, rows ending at different steps: every fast path gives the simple path's text."""
    model, tok = tiny
    ids = [encode_chat(tok, p) for p in PROMPTS for _ in range(3)]
    fast = GenerationSettings(max_new_tokens=10, temperature=temperature, top_p=0.9, batch_size=8)
    simple = GenerationSettings(
        max_new_tokens=10, temperature=temperature, top_p=0.9, batch_size=1, use_kv_cache=False, packed_weights=False
    )
    with model.hooks(fwd_hooks=[eos_bias(tok, bias)]):  # the end token wins about one step in four
        a = generate_ids(model, tok, ids, fast, seed=5)
        b = generate_ids(model, tok, ids, simple, seed=5)
        c = generate_ids(model, tok, ids, GenerationSettings(**{**fast.__dict__, "use_kv_cache": False}), seed=5)
    lengths = {len(ex.response_ids) for ex in a}
    assert len(lengths) > 2, "the end-token bias should end rows at different steps"
    assert a == b == c
    assert all(list(ex.prompt_ids) == p for ex, p in zip(a, ids, strict=True))
    if temperature > 0:  # K samples of one prompt differ: each row draws its own stream
        assert len({a[i].response_ids for i in range(3)}) > 1


@pytest.mark.parametrize("policy", ["all", "generated", "prompt", "from:3"])
def test_steered_sampling_with_shared_prefill_equals_one_by_one(tiny, policy):
    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    steering = SteeringSet.from_functions(
        [SteeringFunction("add", "blocks.0.hook_resid_post", {"vector": 3.0 * torch.randn(64, generator=g)})]
    )
    ids = [encode_chat(tok, p) for p in PROMPTS[:3] for _ in range(2)]
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, batch_size=6)
    with apply_steering(model, steering, positions=policy), model.hooks(fwd_hooks=[eos_bias(tok, 3.0)]):
        batched = generate_ids(model, tok, ids, settings, seed=2)
        single = generate_ids(model, tok, ids, GenerationSettings(**{**settings.__dict__, "batch_size": 1}), seed=2)
    assert batched == single


def test_greedy_equals_plain_hugging_face_generate(tiny):
    """An independent implementation: HF generate on a separate (un-bridged) instance of the same weights."""
    model, tok = tiny
    plain, _ = tiny_hf_model(seed=0)
    eos = end_token_ids(tok)
    for text in PROMPTS[:4]:
        prompt = encode_chat(tok, text)
        [ours] = generate_ids(model, tok, [prompt], GenerationSettings(max_new_tokens=12))
        out = plain.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
        )[0, len(prompt) :].tolist()
        ends = [i for i, t in enumerate(out) if t in eos]
        assert list(ours.response_ids) == out[: ends[0] + 1] if ends else out


def test_greedy_equals_the_bridges_own_generate(tiny):
    model, tok = tiny
    eos = end_token_ids(tok)
    prompt = encode_chat(tok, PROMPTS[1])
    [ours] = generate_ids(model, tok, [prompt], GenerationSettings(max_new_tokens=10))
    theirs = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=eos,
        verbose=False,
        return_type="tokens",
    )[0, len(prompt) :].tolist()
    assert list(ours.response_ids) == theirs[: len(ours.response_ids)]


def test_top_p_sampling_has_hugging_faces_distribution():
    """Over a fine grid of uniforms, each token's share equals HF's temperature + top-p probabilities."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 2
    settings = GenerationSettings(temperature=0.7, top_p=0.8)
    warped = TopPLogitsWarper(0.8)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))
    expected = torch.softmax(warped.double(), -1)
    grid = 20_000
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    for row in range(3):
        chosen = choose_tokens(logits[row].expand(grid, -1), u, settings)
        share = torch.bincount(chosen, minlength=50).double() / grid
        assert torch.allclose(share, expected[row], atol=2 / grid)


def test_sorting_only_the_top_candidates_chooses_what_sorting_everything_chooses(monkeypatch):
    """Rows whose top candidates hold top_p (peaked) and rows that need the whole vocabulary (flat), mixed
    in one batch, with tied probabilities: the same token as the full sort for every uniform."""
    from sims_lens import generation

    g = torch.Generator().manual_seed(1)
    peaked = torch.randn(6, 40, generator=g) * 6
    flat = torch.randn(6, 40, generator=g) * 0.2
    tied = torch.zeros(2, 40)
    tied[:, :5] = 4.0  # five tokens share the top probability
    logits = torch.cat([peaked, flat, tied])[torch.randperm(14, generator=g)]
    settings = GenerationSettings(temperature=0.9, top_p=0.7)
    grid = 257
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    monkeypatch.setattr(generation, "NUCLEUS_CANDIDATES", 40)  # everything: the reference
    full = [choose_tokens(row.expand(grid, -1), u, settings) for row in logits]
    monkeypatch.setattr(generation, "NUCLEUS_CANDIDATES", 8)
    probs = torch.softmax(logits.double() / 0.9, -1)
    fits = probs.topk(8).values.sum(-1) >= 0.7
    assert 0 < int(fits.sum()) < len(logits)  # both paths are taken
    for row, expected in zip(logits, full, strict=True):
        assert torch.equal(choose_tokens(row.expand(grid, -1), u, settings), expected)
    mixed = choose_tokens(logits, u[::19][: len(logits)], settings)  # one batch, both paths
    assert mixed.tolist() == [int(full[i][19 * i]) for i in range(len(logits))]

    # a tie across the candidates' cut that the nucleus reaches into: the lower id must win, as in the full sort
    cut = torch.full((1, 40), -10.0)
    cut[0, 10:17] = 3.0  # seven clear favourites
    cut[0, [5, 30]] = 1.0  # tied for the eighth place, the last candidate's
    settings = GenerationSettings(temperature=1.0, top_p=0.97)
    monkeypatch.setattr(generation, "NUCLEUS_CANDIDATES", 40)
    expected = choose_tokens(cut.expand(grid, -1), u, settings)
    assert 5 in expected.tolist() and 30 not in expected.tolist()
    monkeypatch.setattr(generation, "NUCLEUS_CANDIDATES", 8)
    assert torch.equal(choose_tokens(cut.expand(grid, -1), u, settings), expected)


def test_greedy_choice_is_argmax_and_ignores_uniforms():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0]])
    assert choose_tokens(logits, None, GenerationSettings()).tolist() == [1, 0]


def test_batch_order_sorts_by_length_and_keeps_identical_prompts_together():
    prompts = [[1, 2, 3], [4], [1, 2, 3], [5, 6], [4]]
    assert batch_order(prompts) == [1, 4, 3, 0, 2]


def test_sampling_without_a_seed_uses_the_global_generator(tiny):
    model, tok = tiny
    ids = [encode_chat(tok, "Hi")] * 4
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0)
    torch.manual_seed(0)
    a = generate_ids(model, tok, ids, settings)
    torch.manual_seed(0)
    b = generate_ids(model, tok, ids, settings)
    assert a == b


def test_the_prefix_all_prompts_share_is_prefilled_once_for_one_row(tiny):
    model, tok = tiny
    ids = [encode_chat(tok, p) for p in PROMPTS[:3]]
    shared = shared_prefix_length(ids)
    assert shared > 0 and all(p[:shared] == ids[0][:shared] for p in ids)
    forwards: list[tuple[int, int]] = []

    def record(act, hook):
        forwards.append(tuple(act.shape[:2]))

    with model.hooks(fwd_hooks=[("hook_embed", record)]):
        generate_ids(model, tok, ids, GenerationSettings(max_new_tokens=2))
    rest = max(len(p) for p in ids) - shared
    assert forwards[:2] == [(1, shared), (3, rest)]


def test_shared_prefix_length_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # the shorter one keeps its last token
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 0  # one prompt: nothing to share
    ids, mask = prefix_first_pad([[1, 2, 3], [1, 2, 4, 5]], 2, pad_id=0)
    assert ids.tolist() == [[1, 2, 0, 3], [1, 2, 4, 5]]
    assert mask.tolist() == [[1, 1, 0, 1], [1, 1, 1, 1]]


def test_prepacked_weights_give_the_plain_products_text_and_follow_edits(tiny):
    """Greedy text with oneDNN-prepacked weights equals plain ``F.linear``'s, also after a weight edit via .data."""
    from sims_lens.packed_linear import packed_linears
    from sims_lens.plain_twin import forward_modules

    model, tok = tiny
    ids = [encode_chat(tok, p) for p in PROMPTS[:4]]
    packed = GenerationSettings(max_new_tokens=8, batch_size=4)
    plain = GenerationSettings(max_new_tokens=8, batch_size=4, packed_weights=False)
    with packed_linears(*forward_modules(model)) as switched:
        assert switched > 0 or not torch.backends.mkldnn.is_available()
    linears = [m for m in forward_modules(model)[0].modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all("forward" not in m.__dict__ for m in linears)  # back to their own forward
    assert generate_ids(model, tok, ids, packed) == generate_ids(model, tok, ids, plain)
    weight = next(p for n, p in model.original_model.named_parameters() if "down_proj" in n)
    original = weight.detach().clone()
    try:
        weight.data.mul_(-30.0)  # invisible to torch's version counter
        edited = generate_ids(model, tok, ids, packed)
        assert edited == generate_ids(model, tok, ids, plain)
    finally:
        weight.data.copy_(original)
    assert edited != generate_ids(model, tok, ids, plain)


def test_sliding_window_models_keep_plain_left_padding(tiny, monkeypatch):
    """A sliding window counts cache columns: padding after a shared prefix would shift it, so no sharing."""
    model, tok = tiny
    ids = [encode_chat(tok, p) for p in PROMPTS[:3]]
    monkeypatch.setattr(model.original_model.config, "sliding_window", 4096, raising=False)
    forwards: list[tuple[int, int]] = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda act, hook: forwards.append(tuple(act.shape[:2])))]):
        generate_ids(model, tok, ids, GenerationSettings(max_new_tokens=2))
    assert forwards[0] == (3, max(len(p) for p in ids))


def test_a_linear_whose_forward_is_already_replaced_is_left_alone():
    from sims_lens.packed_linear import packed_linears

    layer = torch.nn.Linear(8, 4)
    calls: list[int] = []
    original = layer.forward

    def patched(x):
        calls.append(1)
        return original(x)

    layer.forward = patched
    with packed_linears(layer) as switched:
        layer(torch.randn(2, 8))
    assert switched == 0 and calls == [1] and layer.forward is patched
