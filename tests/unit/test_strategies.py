"""SIMS-CS and SIMS-PR through the loop, update rules, resume equality, and top:K, on tiny models."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sims_lens.metrics import HELDOUT_METRICS
from sims_lens.oracles import make_oracle
from sims_lens.run import RunWriter, restore_state
from sims_lens.run_folder import RunFolder, open_run
from sims_lens.steering.hooks import active_hook_count
from sims_lens.validation import ConfigError
from tests.helpers import TRAIN, Interrupt, LetterOracle, StopAfter, tiny_sims


@dataclass
class NoiseOracle:
    """Deterministic pseudo-random scores in [0, 1) from the response text (no relation to content)."""

    name: str = "noise"

    def score(self, prompts, responses):
        return [[_noise(r) for r in group] for group in responses]


def _noise(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") / 2**32


def test_ema_combines_the_previous_policy_and_the_new_fit(tiny):
    results = list(tiny_sims(tiny, update="ema", update_rate=0.3).iterate())
    for hook in results[1].hooks:
        expected = 0.7 * results[0].policy.direction(hook) + 0.3 * results[1].fitted.direction(hook)
        torch.testing.assert_close(results[1].policy.direction(hook), expected)


def test_contrast_sampling_pairs_samples_of_different_policies_and_never_reuses_a_pair(tiny):
    sims = tiny_sims(tiny, iterations=3, contrast_sampling=True, **{"contrast.max_pairs": 8})
    results = list(sims.iterate())
    prompts = [{s.prompt_id for s in r.samples} for r in results]
    assert prompts[0] == prompts[1] == prompts[2]  # the prompts recur (pool = N by default)
    keys = [p.key for r in results for p in r.selection.pairs]
    assert len(keys) == len(set(keys)), "a pair entered the policy twice"
    cross = [p for r in results for p in r.selection.pairs if p.cross_iteration]
    assert cross, "no pair joined samples of two different iterations"
    assert all(p.positive.prompt_id == p.negative.prompt_id for r in results for p in r.selection.pairs)
    counted = sum(r["value"] for res in results for r in res.metrics if r["metric"] == "cross_iteration_pairs")
    assert counted == len(cross)


def test_a_prompt_pool_revisits_prompts_on_a_schedule(tiny):
    sims = tiny_sims(tiny, iterations=3, prompts_per_iteration=2, prompt_pool=4)
    ids = [[p.id for p in sims.prompts(t)] for t in (1, 2, 3)]
    assert ids[0] != ids[1] and ids[2] == ids[0] and len(set(ids[0] + ids[1])) == 4


def rank_oracle(prompts, responses):
    """A plain function oracle whose scores only rank one prompt's responses (relative)."""
    return [[float(sorted(group).index(r)) for r in group] for group in responses]


def test_contrast_sampling_with_a_relative_oracle_is_one_message_on_every_path(tiny, tmp_path, capsys, monkeypatch):
    from sims_lens.cli import main
    from sims_lens.loop import Sims

    model, tok = tiny
    with pytest.raises(ConfigError, match="relative scores") as direct:
        tiny_sims(tiny, rank_oracle, oracle_relative=True, contrast_sampling=True)
    assert "'rank_oracle' only ranks the responses" in str(direct.value) and "\n" not in str(direct.value)
    settings = {"layers": [0], "observe": "none", "contrast_sampling": True}
    with pytest.raises(ConfigError) as named:
        Sims(model, tok, oracle="self_judge", **settings)
    monkeypatch.setattr("sims_lens.models.load_model", lambda *args, **kwargs: (model, tok))
    sets = ["layers=[0]", 'observe="none"', "contrast_sampling=true", 'oracle="self_judge"']
    code = main(["run", "--out", str(tmp_path / "run"), *[arg for s in sets for arg in ("--set", s)]])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {named.value}"  # the same one line
    assert not (tmp_path / "run").exists()  # nothing written
    assert (
        tiny_sims(tiny, rank_oracle, oracle_relative=True).config.oracle == "python:oracle rank_oracle relative"
    )  # fine without


def _spy(judge, model, calls: list[int]) -> None:
    """Record how many hooks are on the model each time the self-judge scores."""
    score = judge.score

    def spied(prompts, responses):
        calls.append(active_hook_count(model))
        return score(prompts, responses)

    judge.score = spied


@pytest.mark.parametrize("inside_composite", [False, True])
def test_the_self_judge_judges_as_the_policy_in_training_and_as_the_base_model_in_evaluation(tiny, inside_composite):
    model, tok = tiny
    if inside_composite:
        oracle = make_oracle(
            "composite", {"components": {"self_judge": 1.0, "lexicon_sentiment": 0.1}}, model=model, tokenizer=tok
        )
        judge = oracle.oracles["self_judge"]
    else:
        oracle = judge = make_oracle("self_judge", model=model, tokenizer=tok)
    sims = tiny_sims(tiny, oracle)
    training: list[int] = []
    _spy(judge, model, training)
    sims.callbacks = [_Phases(sims, training)]
    results = list(sims.iterate())
    phases = sims.callbacks[0].log
    # iteration 1 samples from pi_0 (no hooks); iteration 2's judge runs under pi_1's hooks
    calls = {where: [n for phase, n in phases if phase == where] for where in ("train 1", "train 2", "eval 1")}
    assert calls["train 1"] and set(calls["train 1"]) == {0}
    assert calls["train 2"] and all(n > 0 for n in calls["train 2"])
    assert calls["eval 1"] and all(n == 0 for phase, n in phases if phase.startswith("eval")), phases
    rows = {(r["metric"], r["split"]) for r in results[-1].metrics}
    assert ("reward_mean", "heldout") not in rows and ("reward_mean", "train") not in rows  # zero-sum means
    assert {("win_rate_vs_base", "heldout"), ("bt_strength_vs_base", "heldout")} <= rows


class _Phases:
    """Labels each judge call with the loop phase it happened in."""

    def __init__(self, sims, calls: list[int]) -> None:
        self.sims, self.calls, self.log, self.where, self.seen = sims, calls, [], "eval 0", 0

    def _flush(self) -> None:
        self.log += [(self.where, n) for n in self.calls[self.seen :]]
        self.seen = len(self.calls)

    def on_phase(self, iteration, phase, payload):
        self._flush()
        self.where = {"sample": f"train {iteration}", "fit": f"eval {iteration}"}.get(phase, self.where)

    def on_iteration(self, result):
        self._flush()


def _run(tiny, out: Path, stop_after: int | None = None, **settings) -> RunFolder:
    sims = tiny_sims(tiny, **settings)
    resume = RunFolder(out).has_config()
    folder, _, _ = open_run(out, None if resume else sims.config, resume=resume)
    sims.state = restore_state(folder, sims.config, sims.model, sims.tokenizer)
    sims.callbacks = [RunWriter(folder, sims.model)] + ([StopAfter(stop_after + 1)] if stop_after else [])
    with contextlib.suppress(Interrupt):
        list(sims.iterate())
    return folder


def _files(folder: RunFolder) -> dict[str, bytes]:
    return {str(p.relative_to(folder.path)): p.read_bytes() for p in sorted(folder.path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("contrast", [False, True])
def test_a_resumed_run_is_byte_for_byte_the_uninterrupted_one(tiny, tmp_path: Path, contrast: bool):
    settings = {"iterations": 3, "contrast_sampling": contrast, "contrast.max_pairs": 8}
    whole = _run(tiny, tmp_path / "whole", **settings)
    _run(tiny, tmp_path / "cut", stop_after=1, **settings)
    assert RunFolder(tmp_path / "cut").completed_iterations == 1
    resumed = _run(tiny, tmp_path / "cut", **settings)
    assert whole.completed_iterations == resumed.completed_iterations == 3
    a, b = _files(whole), _files(resumed)
    assert sorted(a) == sorted(b)
    assert {f"observed/iter_00{t}.safetensors" for t in (1, 2, 3)} <= set(a)  # every layer observed, kept on resume
    assert {name for name in a if a[name] != b[name]} == set()
    pairs = [json.loads(line) for line in (whole.path / "pairs.jsonl").read_text().splitlines()]
    assert {p["update"] for p in pairs} == {1, 2, 3}
    assert set(pairs[0]) == {"update", "prompt_id", "positive", "negative", "margin", "applied"}
    assert set(pairs[0]["positive"]) == {"iteration", "index", "reward"}
    if contrast:
        assert any(p["positive"]["iteration"] != p["negative"]["iteration"] for p in pairs)
        keys = [(p["prompt_id"], json.dumps(p["positive"]), json.dumps(p["negative"])) for p in pairs]
        assert len(keys) == len(set(keys))


def test_top_k_finds_the_layer_where_a_difference_was_planted(tmp_path: Path):
    from sims_lens.loop import Sims
    from sims_lens.tiny import tiny_model

    model, tok = tiny_model(n_layers=4, d_model=64, seed=1)
    planted = 3  # the last layer: nothing downstream carries it, and ties would favour lower layers
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))

    class Planted(Sims):
        """The model's activations of preferred responses carry an extra direction at one layer."""

        def capture(self, iteration, selection, hooks, observed=()):
            captured = super().capture(iteration, selection, hooks, observed)
            if f"blocks.{planted}.hook_resid_post" in hooks:
                i = hooks.index(f"blocks.{planted}.hook_resid_post")
                for t in captured.positives:
                    t[:, i] += 3.0 * direction
            return captured

    base = tiny_sims(
        (model, tok), NoiseOracle(), iterations=1, prompts_per_iteration=4, validation_size=4, layers="top:1"
    )
    sims = Planted(
        model,
        tok,
        config=base.config,
        oracle=NoiseOracle(),
        prompts=TRAIN,
        heldout_prompts=base.heldout_prompts,
        progress=False,
    )
    [result] = list(sims.iterate())
    assert sims.state.layers == [planted] and result.hooks == [f"blocks.{planted}.hook_resid_post"]


def test_heldout_metric_names_are_the_documented_ones(tiny):
    [result] = list(tiny_sims(tiny, LetterOracle(), iterations=1).iterate())
    names = {r["metric"] for r in result.metrics if r["split"] == "heldout"}
    assert set(HELDOUT_METRICS) <= names and "bt_strength_vs_base" in names
