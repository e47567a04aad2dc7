"""Response spans: end tokens, what capture keeps, where generation stops, token-weighted perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sims_lens import generation
from sims_lens.chat import Exchange, encode_chat, end_token_ids, split_generated
from sims_lens.evaluation import Evaluation, response_nll
from sims_lens.generation import GenerationSettings, generate_ids

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
PROMPTS = ["Hi", "Tell me a story about the sea please", "What is 2+2?"]


# ---------------------------------------------------------------- end tokens


def _tokenizer(specials: dict[str, bool], eos: str, folder: Path | None = None):
    """A word-level tokenizer with the given extra tokens (token -> special?), saved to ``folder`` if given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in specials.items()])
    tok.add_special_tokens({"eos_token": eos})
    if folder is None:
        return tok
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def test_end_tokens_of_the_tiny_chat_model(tiny):
    _, tok = tiny
    assert end_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")] == [tok.eos_token_id]


def test_end_tokens_include_other_chat_formats_turn_ends_only_as_special_tokens():
    tok = _tokenizer(
        {"<|end_of_text|>": True, "<|eot_id|>": True, "<end_of_turn>": True, "<|end|>": False, "<|im_end|>": False},
        eos="<|end_of_text|>",
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|end_of_text|>", "<|eot_id|>", "<end_of_turn>", "<|im_end|>"]}
    # <|end|> is an ordinary (non-special) token here, so it does not end a turn; <|im_end|> counts if present
    assert end_token_ids(tok) == sorted(ids.values())
    assert tok.convert_tokens_to_ids("<|end|>") not in end_token_ids(tok)


def test_end_tokens_include_the_generation_config_of_a_local_folder(tmp_path: Path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1, 99999]}))
    tok = _tokenizer({"</s>": True}, eos="</s>", folder=folder)
    # 99999 is outside the vocabulary and dropped; the result is sorted and free of duplicates
    assert end_token_ids(tok) == sorted({1, 2, tok.eos_token_id})
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert end_token_ids(tok) == sorted({0, tok.eos_token_id})
    (folder / "generation_config.json").write_text("not json")
    assert end_token_ids(tok) == [tok.eos_token_id]


def test_split_generated_cuts_at_the_first_end_token_of_any_kind():
    row = [0, 0, 11, 12, 13, 21, 7, 22, 2, 0]
    ex = split_generated(row, padded_prompt_width=5, prompt_mask=[0, 0, 1, 1, 1], eos_ids=[2, 7])
    assert ex == Exchange((11, 12, 13), (21, 7))
    truncated = split_generated([5, 21, 22], padded_prompt_width=1, prompt_mask=[1], eos_ids={2, 7})
    assert truncated.response_ids == (21, 22)


# ---------------------------------------------------------------- generation stops at every end token


def _forcing_hook(end_ids: list[int], forced: int, step: int, row: int, calls: list[int]):
    """Logits hook: no end token ever wins, except ``forced`` in ``row`` at generation step ``step``."""

    def hook(act, hook):
        calls.append(1)
        act = act.clone()
        act[:, -1, end_ids] -= 1e4
        if len(calls) == step:
            act[row, -1, forced] += 2e4
        return act

    return hook


@pytest.mark.parametrize("use_kv_cache", [True, False])
@pytest.mark.parametrize("which", [0, 1])
def test_generation_stops_at_either_end_token(tiny, monkeypatch, which, use_kv_cache):
    """Two end tokens (<|endoftext|> and EOS <|im_end|>); forcing either one stops that row."""
    model, tok = tiny
    ends = sorted([tok.convert_tokens_to_ids("<|endoftext|>"), tok.eos_token_id])
    monkeypatch.setattr(generation, "end_token_ids", lambda tokenizer: ends)
    forced = ends[which]
    prompts = [encode_chat(tok, p) for p in PROMPTS[:2]]
    settings = GenerationSettings(max_new_tokens=6, use_kv_cache=use_kv_cache)

    calls: list[int] = []
    with model.hooks(fwd_hooks=[("unembed.hook_out", _forcing_hook(ends, forced, 2, 0, calls))]):
        [alone] = generate_ids(model, tok, prompts[:1], settings)
    assert len(alone.response_ids) == 2 and alone.response_ids[-1] == forced
    assert len(calls) == 2  # the model stopped: no forward after the end token

    calls.clear()
    with model.hooks(fwd_hooks=[("unembed.hook_out", _forcing_hook(ends, forced, 2, 0, calls))]):
        first, second = generate_ids(model, tok, prompts, settings)
    assert first == alone
    assert len(second.response_ids) == 6 and not set(second.response_ids) & set(ends)  # the other row goes on
    assert len(calls) == 6


# ---------------------------------------------------------------- token-weighted perplexity


def test_perplexity_weights_responses_by_their_tokens():
    exchanges = [Exchange((1,), (5,)), Exchange((1,), (5, 6, 7))]
    evaluation = Evaluation(["a", "b"], ["x", "y z w"], exchanges, [0.0, 0.0], nll=[2.0, 1.0])
    # by hand: (2.0 * 1 + 1.0 * 3) / (1 + 3) = 1.25 (the mean of the means would give 1.5)
    assert evaluation.perplexity == pytest.approx(math.exp(1.25))


def test_perplexity_pools_the_tokens_response_nll_scores(tiny):
    """response_nll scores every response token, the end token included; pooled, that is the perplexity."""
    model, tok = tiny
    eos = tok.eos_token_id
    exchanges = [
        Exchange(tuple(encode_chat(tok, "Hi")), (50, eos)),
        Exchange(tuple(encode_chat(tok, "Tell me a story")), (80, 90, 95, 96, eos)),
    ]
    nll = response_nll(model, exchanges, tok.pad_token_id)
    token_nll = []
    for ex, mean in zip(exchanges, nll, strict=True):
        with torch.no_grad():
            logprobs = model(torch.tensor([ex.ids])).float().log_softmax(-1)[0]
        start, end = ex.response_span
        per_token = [-float(logprobs[i - 1, ex.ids[i]]) for i in range(start, end)]
        assert len(per_token) == len(ex.response_ids)
        assert mean == pytest.approx(sum(per_token) / len(per_token), abs=1e-4)
        token_nll.append(per_token)
    evaluation = Evaluation(["a", "b"], ["", ""], exchanges, [0.0, 0.0], nll)
    pooled = [x for per_token in token_nll for x in per_token]
    assert evaluation.perplexity == pytest.approx(math.exp(sum(pooled) / len(pooled)), rel=1e-4)
