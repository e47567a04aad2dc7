"""The validation split: the loop's choices (guard rail, top:K) read training prompts set aside, never held-out ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sims_lens.loop as loop_module
from sims_lens.config import SimsConfig
from sims_lens.prompts import Prompt, split_validation
from sims_lens.validation import ConfigError
from tests.helpers import HELDOUT, TRAIN, tiny_sims

PROMPTS = [Prompt(f"p{i}", f"prompt number {i}") for i in range(20)]


def test_the_split_is_fixed_by_the_prompts_alone():
    train, validation = split_validation(PROMPTS, 5)
    assert len(validation) == 5 and len(train) == 15
    assert {p.id for p in train}.isdisjoint(p.id for p in validation)
    assert [p for p in PROMPTS if p in train] == train  # training prompts keep their order
    shuffled_train, shuffled_validation = split_validation(PROMPTS[::-1], 5)
    assert shuffled_validation == validation and set(shuffled_train) == set(train)
    assert split_validation(PROMPTS, 0) == (PROMPTS, [])
    with pytest.raises(ValueError, match="validation_size = 20 but there are only 20"):
        split_validation(PROMPTS, 20)
    twice = [*PROMPTS, *(Prompt(f"again{p.id}", p.text) for p in PROMPTS)]  # every text twice
    train, validation = split_validation(twice, 5)
    assert {p.text for p in train}.isdisjoint(p.text for p in validation)  # a repeat never straddles


def test_validation_size_is_checked(tiny):
    with pytest.raises(ConfigError, match="validation_size"):
        SimsConfig(validation_size=-1)
    with pytest.raises(ConfigError, match=r"validation_size.*guard rail"):
        SimsConfig(validation_size=0)  # the guard is on by default
    assert SimsConfig(validation_size=0, max_perplexity_ratio=0).uses_validation is False
    with pytest.raises(ConfigError, match="validation_size = 8 but there are only 8 training prompts"):
        tiny_sims(tiny, validation_size=8)


def test_validation_prompts_are_never_drawn_for_training(tiny):
    sims = tiny_sims(tiny, iterations=3, prompts_per_iteration=6)
    validation = {p.text for p in sims.validation_prompts}
    assert len(validation) == 2 and validation <= {p.text for p in TRAIN}
    for result in sims.iterate():
        assert validation.isdisjoint(s.prompt for s in result.samples)
    off = tiny_sims(tiny, max_perplexity_ratio=0, prompts_per_iteration=8)  # nothing to validate: nothing set aside
    assert off.validation_prompts == [] and len(off.train_prompts) == len(TRAIN)


@pytest.fixture
def seen(monkeypatch):
    """Every prompt list the loop's evaluations and its sampling see, tagged with the loop method asking."""
    calls: list[tuple[str, set[str]]] = []
    phase = {"now": "other"}
    real_evaluate, real_sample = loop_module.evaluate, loop_module.Sims.sample

    def evaluate(model, tokenizer, prompts, *args, **kwargs):
        calls.append((phase["now"], {p.text for p in prompts}))
        return real_evaluate(model, tokenizer, prompts, *args, **kwargs)

    def sample(self, iteration, prompts, *args, **kwargs):
        calls.append((phase["now"], {p.text for p in prompts}))
        return real_sample(self, iteration, prompts, *args, **kwargs)

    def tagged(name):
        real = getattr(loop_module.Sims, name)

        def wrapper(self, *args, **kwargs):
            before, phase["now"] = phase["now"], name
            try:
                return real(self, *args, **kwargs)
            finally:
                phase["now"] = before

        return wrapper

    monkeypatch.setattr(loop_module, "evaluate", evaluate)
    monkeypatch.setattr(loop_module.Sims, "sample", sample)
    for name in ("guard", "choose_layers"):
        monkeypatch.setattr(loop_module.Sims, name, tagged(name))
    return calls


def test_the_guard_rail_and_top_k_never_see_a_heldout_prompt(tiny, seen):
    sims = tiny_sims(tiny, layers="top:1", iterations=2, validation_size=3, prompts_per_iteration=5)
    results = list(sims.iterate())
    heldout = {p.text for p in HELDOUT}
    validation = {p.text for p in sims.validation_prompts}
    by_phase: dict[str, list[set[str]]] = {}
    for phase, texts in seen:
        by_phase.setdefault(phase, []).append(texts)
    assert len(by_phase["guard"]) == len(results) and by_phase["choose_layers"]  # both ran and were watched
    for phase in ("guard", "choose_layers"):
        for texts in by_phase[phase]:
            assert texts == validation and texts.isdisjoint(heldout), phase
    assert any(texts == heldout for texts in by_phase["other"])  # held-out prompts are still reported on


def test_the_guard_judges_validation_perplexity_not_heldout(tiny, monkeypatch):
    """Held-out evaluations that would fail the guard do not: it never reads them."""
    real = loop_module.evaluate
    heldout = {p.text for p in HELDOUT}

    def evaluate(model, tokenizer, prompts, *args, **kwargs):
        result = real(model, tokenizer, prompts, *args, **kwargs)
        if {p.text for p in prompts} == heldout and kwargs.get("steering") is not None:
            result.nll = [50.0 for _ in result.nll]  # a wrecked held-out perplexity
        return result

    monkeypatch.setattr(loop_module, "evaluate", evaluate)
    results = list(tiny_sims(tiny, iterations=1).iterate())
    assert not results[0].rejected


def test_a_rejected_iterations_pairs_are_recorded_as_not_applied(tiny, tmp_path: Path):
    from sims_lens.tiny import tiny_model

    peaked = tiny_model(n_layers=2, d_model=64, seed=0, init_std=0.3)  # a wrecked policy's text is unlikely here
    out = tmp_path / "run"
    # every policy wrecks the text, on a memory bank whose used set must stay clean
    sims = tiny_sims(peaked, out=out, iterations=2, multiplier=1e3, layers=[0], contrast_sampling=True)
    results = list(sims.iterate())
    assert all(r.rejected for r in results)
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert records and all(r["applied"] is False for r in records)
    assert sims.state.bank is not None and not sims.state.bank.used
    kept = list(tiny_sims(tiny, iterations=1, out=tmp_path / "ok").iterate())
    assert not kept[0].rejected
    ok = [json.loads(line) for line in (tmp_path / "ok" / "pairs.jsonl").read_text().splitlines()]
    assert ok and all(r["applied"] is True for r in ok)
