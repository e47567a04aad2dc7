"""The answer cache: the unsteered model's answers and NLL read back instead of computed (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from sims_lens import answer_cache, fingerprint
from sims_lens.answer_cache import generate_cached
from sims_lens.chat import encode_chat
from sims_lens.evaluation import evaluate, response_nll
from sims_lens.fingerprint import model_fingerprint
from sims_lens.generation import GenerationSettings
from sims_lens.prompts import Prompt
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.hooks import apply_steering
from sims_lens.tiny import tiny_model

SETTINGS = GenerationSettings(max_new_tokens=5, temperature=1.0, top_p=0.9, batch_size=4)
PROMPTS = [Prompt("a", "Hello there"), Prompt("b", "Tell me about the sea"), Prompt("c", "Why?")]


class CountingOracle:
    name = "length"

    def score(self, prompts, responses):
        return [[float(len(r)) for r in group] for group in responses]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "answers"
    monkeypatch.setenv("SIMS_LENS_ANSWER_CACHE", str(folder))
    return folder


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """How many prompts the sampler was run on, per call (the cache's computations)."""
    seen: list[int] = []
    real = answer_cache.generate_ids

    def counting(model, tokenizer, prompts, settings, seed=None, on_batch=None):
        seen.append(len(prompts))
        return real(model, tokenizer, prompts, settings, seed=seed, on_batch=on_batch)

    monkeypatch.setattr(answer_cache, "generate_ids", counting)
    return seen


def _ids(tok, n: int = 2) -> list[list[int]]:
    return [encode_chat(tok, p.text) for p in PROMPTS for _ in range(n)]


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.json")) if folder.exists() else []


def test_a_second_evaluation_reads_the_first_ones_answers_and_nll(tiny, cache, calls, monkeypatch):
    model, tok = tiny
    first = evaluate(model, tok, PROMPTS, CountingOracle(), SETTINGS, samples_per_prompt=2, seed=7)
    assert calls == [6] and len(_entries(cache)) == 2  # the answers and their NLL

    def no_forward(*args, **kwargs):
        raise AssertionError("the NLL should have been read from the cache")

    monkeypatch.setattr("sims_lens.evaluation._response_nll", no_forward)
    again = evaluate(model, tok, PROMPTS, CountingOracle(), SETTINGS, samples_per_prompt=2, seed=7)
    assert calls == [6]  # nothing sampled
    assert again.exchanges == first.exchanges and again.responses == first.responses
    assert again.nll == first.nll and again.rewards == first.rewards


def test_cached_answers_are_those_computed_without_the_cache(tiny, cache, monkeypatch):
    model, tok = tiny
    monkeypatch.setenv("SIMS_LENS_ANSWER_CACHE", "off")
    fresh = evaluate(model, tok, PROMPTS, CountingOracle(), SETTINGS, samples_per_prompt=2, seed=3)
    assert not _entries(cache)
    monkeypatch.setenv("SIMS_LENS_ANSWER_CACHE", str(cache))
    evaluate(model, tok, PROMPTS, CountingOracle(), SETTINGS, samples_per_prompt=2, seed=3)  # fills the cache
    read = evaluate(model, tok, PROMPTS, CountingOracle(), SETTINGS, samples_per_prompt=2, seed=3)
    assert read.exchanges == fresh.exchanges and read.nll == pytest.approx(fresh.nll, abs=0, rel=0)


def test_other_seeds_settings_prompts_or_weights_are_other_entries(tiny, cache, calls):
    model, tok = tiny
    ids = _ids(tok)
    generate_cached(model, tok, ids, SETTINGS, 1)
    generate_cached(model, tok, ids, SETTINGS, 1)
    assert calls == [6]
    generate_cached(model, tok, ids, SETTINGS, 2)
    generate_cached(model, tok, ids, GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=0.9, batch_size=4), 1)
    generate_cached(model, tok, ids[:4], SETTINGS, 1)
    other, _ = tiny_model(n_layers=2, d_model=64, seed=1)  # same architecture, other weights
    assert model_fingerprint(other) != model_fingerprint(model)
    generate_cached(other, tok, ids, SETTINGS, 1)
    assert calls == [6, 6, 6, 4, 6] and len(_entries(cache)) == 5


def test_nothing_is_cached_under_hooks_or_without_a_seed(tiny, cache, calls):
    model, tok = tiny
    ids = _ids(tok)
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 5
    steering = SteeringSet.from_functions([SteeringFunction("add", "blocks.0.hook_resid_post", {"vector": vector})])
    with apply_steering(model, steering):
        steered = generate_cached(model, tok, ids, SETTINGS, 1)
        generate_cached(model, tok, ids, SETTINGS, 1)
    generate_cached(model, tok, ids, SETTINGS, None)
    assert calls == [6, 6, 6] and not _entries(cache)
    base = generate_cached(model, tok, ids, SETTINGS, 1)  # the base model's answers: not the steered ones
    assert base != steered and len(_entries(cache)) == 1


def test_an_unreadable_entry_is_computed_again_and_rewritten(tiny, cache, calls, capsys):
    model, tok = tiny
    ids = _ids(tok)
    expected = generate_cached(model, tok, ids, SETTINGS, 4)
    [entry] = _entries(cache)
    for broken in ("", "[[1, 2], [3", json.dumps({"not": "a list"}), json.dumps([[[1], [2]]])):
        entry.write_text(broken)
        assert generate_cached(model, tok, ids, SETTINGS, 4) == expected
        assert "answer cache entry" in capsys.readouterr().err
        assert json.loads(entry.read_text()) == [[list(ex.prompt_ids), list(ex.response_ids)] for ex in expected]
    assert len(calls) == 5


def test_the_nll_entry_is_per_set_of_responses(tiny, cache):
    model, tok = tiny
    exchanges = generate_cached(model, tok, _ids(tok), SETTINGS, 5)
    nll = response_nll(model, exchanges, tok.pad_token_id, 4)
    assert response_nll(model, exchanges, tok.pad_token_id, 4) == nll
    assert response_nll(model, exchanges[:3], tok.pad_token_id, 4) == pytest.approx(nll[:3], abs=1e-5)
    assert len(_entries(cache)) == 3  # the answers, and two sets of NLL


def test_a_second_run_with_the_same_seed_reads_back_pi0s_answers_and_gives_the_same_run(tiny, cache, calls):
    """The base model's held-out answers and iteration 1's training samples (pi_0's) come from the cache."""
    from tests.helpers import tiny_sims

    first = list(tiny_sims(tiny).iterate())
    # base held-out and validation, then per iteration: training samples, validation (the guard), held-out
    assert calls == [2, 2, 12, 2, 2, 12, 2, 2]
    second = list(tiny_sims(tiny).iterate())
    assert calls[8:] == [2, 2, 12, 2, 2]  # the steered policies' answers are computed again
    for a, b in zip(first, second, strict=True):
        assert [s.response for s in a.samples] == [s.response for s in b.samples]
        assert a.heldout.responses == b.heldout.responses and a.heldout.nll == b.heldout.nll
        assert all(torch.equal(x, y) for x, y in zip(a.activations.positives, b.activations.positives, strict=True))


def test_the_fingerprint_follows_any_in_place_edit_and_reordered_rows():
    model, _ = tiny_model(n_layers=1, d_model=32, seed=2)
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    weight = next(p for p in model.original_model.parameters() if p.ndim == 2)
    original = weight.detach().clone()
    with torch.no_grad():
        weight[3, 5] += 1.0  # one element, not among the probed ones: torch's version counter sees it
        assert model_fingerprint(model) != before
        weight.copy_(original)
        assert model_fingerprint(model) == before  # the same weights again: the same entries
        weight[[0, 1]] = original[[1, 0]]  # two rows swapped: the same sums, other weights
        assert model_fingerprint(model) != before
        weight.copy_(original)


def test_edits_through_data_are_seen_by_the_probe_or_after_forget():
    """``.data`` has its own version counter: the probe sees broad edits; ``forget`` makes any edit seen."""
    model, _ = tiny_model(n_layers=1, d_model=32, seed=2)
    before = model_fingerprint(model)
    weight = next(p for p in model.original_model.parameters() if p.ndim == 2)
    original = weight.detach().clone()
    weight.data[7].mul_(2.0)  # a whole row: probed elements among it
    assert model_fingerprint(model) != before
    weight.data.copy_(original)
    assert model_fingerprint(model) == before
    weight.data[3, 5] += 1.0  # one unprobed element through .data
    fingerprint.forget(model)
    assert model_fingerprint(model) != before
    weight.data.copy_(original)
    fingerprint.forget()
    assert model_fingerprint(model) == before


@pytest.mark.parametrize("d_model", [32, 128])
def test_a_second_fingerprint_of_unchanged_weights_reads_a_probe_per_tensor(monkeypatch, d_model):
    """The key's cost on a second call: no pass over any tensor, :data:`PROBE` elements per tensor at most."""
    model, _ = tiny_model(n_layers=2, d_model=d_model, seed=2)
    passes: list[int] = []
    full_pass = fingerprint.tensor_sums
    monkeypatch.setattr(fingerprint, "tensor_sums", lambda flat: passes.append(flat.numel()) or full_pass(flat))
    first = model_fingerprint(model)
    tensors = [*model.original_model.parameters(), *model.original_model.buffers()]
    assert len(passes) == len(tensors)
    passes.clear()
    assert model_fingerprint(model) == first and passes == []
    weight = next(p for p in model.original_model.parameters() if p.ndim == 2)
    with torch.no_grad():
        weight.mul_(1.5)
    assert model_fingerprint(model) != first and passes == [weight.numel()]  # only the edited tensor is read
    assert [len(fingerprint._probe_index(t.numel(), t.device)) for t in tensors] == [
        min(t.numel(), fingerprint.PROBE) for t in tensors
    ]


def test_eval_reads_back_the_unsteered_answers_and_gives_the_same_table(tiny, tmp_path, monkeypatch, calls):
    """``sims-lens eval`` twice: the second pass samples only the steered policies; the estimates are equal."""
    from sims_lens.eval_runs import EvalSettings, evaluate_runs
    from tests.helpers import FakeRelevance, LetterOracle, make_run

    run = make_run(tiny, tmp_path / "run", 0)  # made with the cache off (the tests' default)
    monkeypatch.setenv("SIMS_LENS_ANSWER_CACHE", str(tmp_path / "answers"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"h{i}", "prompt": t}) + "\n" for i, t in enumerate(["Hi", "Why?"])))
    model, tok = tiny
    settings = EvalSettings(prompts=str(prompts), samples=2, n_boot=100)

    def evaluate(out: str):
        oracles = {"oracle": LetterOracle(), "relevance": FakeRelevance()}
        return evaluate_runs([run], tmp_path / out, model, tok, settings, **oracles)

    before = len(calls)  # the run's own sampling
    first = evaluate("first")
    n_first = len(calls) - before
    second = evaluate("second")
    # read back: base, prompting, best_of_k and fresh_pairs' two rounds of pi_0 samples (5 unsteered calls);
    # sampled again: the 2 policies, static_first, static_all and 3 norm-matched sets (one equals static_first)
    assert (n_first, len(calls) - before - n_first) == (12, 7)
    pd.testing.assert_frame_equal(first, second)


def test_the_fingerprint_of_inference_tensors_is_read_in_full():
    """Weights made under inference_mode have no version counter: no shortcut, the same digest."""
    with torch.inference_mode():
        model, _ = tiny_model(n_layers=1, d_model=32, seed=2)
    assert model_fingerprint(model) == model_fingerprint(model)
