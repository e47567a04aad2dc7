"""The SIMS loop on the tiny model: end to end, update rules, the guard rail, resume."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sims_lens.chat import Exchange
from sims_lens.config import load_config
from sims_lens.loop import NotSeparableError
from sims_lens.run import RunWriter, restore_state
from sims_lens.run_folder import RunFolder, RunFolderError, open_run
from sims_lens.steering.io import load_steering
from tests.helpers import HELDOUT, ConstantOracle, Interrupt, LetterOracle, StopAfter, tiny_sims


def test_two_iterations_end_to_end(tiny):
    sims = tiny_sims(tiny)
    results = list(sims.iterate())
    assert [r.iteration for r in results] == [1, 2]
    assert sims.state.base_heldout is not None and sims.state.completed == 2
    for r in results:
        assert r.hooks == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
        assert len(r.samples) == 4 * 3 and {s.label for s in r.samples} <= {"+", "-", ""}
        assert sum(s.label == "+" for s in r.samples) == len(r.selection.pairs) > 0
        assert all(p.positive.reward > p.negative.reward for p in r.selection.pairs)
        metrics = {(m["metric"], m["split"], m["layer"]) for m in r.metrics}
        for name in ["reward_mean", "win_rate_vs_base", "perplexity_under_base", "response_length"]:
            assert (name, "heldout", None) in metrics
    # accumulate: the policy after two iterations is the sum of the two fits
    for hook in results[1].hooks:
        expected = results[0].fitted.direction(hook) + results[1].fitted.direction(hook)
        torch.testing.assert_close(results[1].policy.direction(hook), expected)


def test_refit_keeps_only_the_latest_update(tiny):
    results = list(tiny_sims(tiny, update="refit").iterate())
    hook = results[1].hooks[0]
    torch.testing.assert_close(results[1].policy.direction(hook), results[1].fitted.direction(hook))


def test_an_oracle_that_cannot_separate_is_a_clear_error(tiny):
    with pytest.raises(NotSeparableError, match="margin"):
        list(tiny_sims(tiny, ConstantOracle()).iterate())


def test_top_k_layers_by_probe_accuracy(tiny):
    results = list(tiny_sims(tiny, layers="top:1", iterations=1, prompts_per_iteration=6).iterate())
    assert len(results[0].hooks) == 1


def test_hpr_runs_in_the_loop(tiny):
    results = list(tiny_sims(tiny, learner="hpr", iterations=1, **{"learners.hpr.epochs": 5}).iterate())
    assert results[0].policy.functions[results[0].hooks[0]][0].edit == "hpr"


def test_hpr_in_the_loop_stays_within_the_guard_rail(tiny):
    """HPR's defaults (generated positions, rotations bounded by the reflection) keep perplexity in bounds."""
    sims = tiny_sims(tiny, learner="hpr", iterations=2, **{"learners.hpr.epochs": 5})
    results = list(sims.iterate())
    assert sims.positions == "generated"
    for r in results:
        guard = {m["metric"]: m["value"] for m in r.metrics if m["split"] == "guard"}
        assert guard["rejected"] == 0.0 and not r.rejected
        assert guard["perplexity_ratio"] < sims.config.max_perplexity_ratio
        assert r.policy.positions == "generated"


@pytest.fixture(scope="module")
def peaked():
    """A tiny model with peaked next-token distributions: a wrecked policy's text is unlikely under it."""
    from sims_lens.tiny import tiny_model

    return tiny_model(n_layers=2, d_model=64, seed=0, init_std=0.3)


def test_guard_rail_rejects_a_broken_policy_and_keeps_the_previous_one(peaked):
    """A vector 10^3 times the fit's wrecks the text: the guard flags it and keeps pi_0's evaluation."""
    sims = tiny_sims(peaked, iterations=1, multiplier=1e3, layers=[0])
    [result] = list(sims.iterate())
    guard = {m["metric"]: m["value"] for m in result.metrics if m["split"] == "guard"}
    assert result.rejected and guard["rejected"] == 1.0
    assert guard["perplexity_ratio"] > sims.config.max_perplexity_ratio
    assert result.heldout is sims.state.base_heldout  # pi_0 kept: its held-out evaluation stands
    assert all(fn.multiplier == 0.0 for fn in result.policy)  # the fit, switched off
    heldout = {m["metric"]: m["value"] for m in result.metrics if m["split"] == "heldout"}
    assert heldout["perplexity_under_base"] == pytest.approx(sims.state.base_heldout.perplexity)


def test_guard_rail_can_stop_the_run_and_can_be_turned_off(peaked):
    from sims_lens.loop import PolicyRejectedError

    seen = []
    sims = tiny_sims(peaked, iterations=2, multiplier=1e3, layers=[0], on_rejected="stop")
    sims.callbacks = [type("Seen", (), {"on_iteration": lambda self, r: seen.append(r)})()]
    with pytest.raises(PolicyRejectedError, match="max_perplexity_ratio"):
        list(sims.iterate())
    assert [r.iteration for r in seen] == [1] and sims.state.completed == 1  # the iteration is recorded first
    [result] = list(tiny_sims(peaked, iterations=1, multiplier=1e3, layers=[0], max_perplexity_ratio=0).iterate())
    assert not result.rejected


@pytest.mark.parametrize(("key", "value"), [("max_perplexity_ratio", 0.5), ("on_rejected", "ignore")])
def test_guard_settings_are_validated(key, value):
    from sims_lens.validation import ConfigError

    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"{key}={json.dumps(value)}"])


def test_interrupted_run_resumes_from_the_last_finished_iteration(tiny, tmp_path: Path):
    out = tmp_path / "run"
    sims = tiny_sims(tiny)
    folder, _, done = open_run(out, sims.config, resume=False)
    sims.callbacks = [RunWriter(folder, sims.model), StopAfter(2)]
    with pytest.raises(Interrupt):
        list(sims.iterate())
    assert json.loads((out / "state.json").read_text())["completed_iterations"] == 1
    first = (out / "steering" / "iter_001.safetensors").read_bytes()

    folder, _, done = open_run(out, None, resume=True)
    assert done == 1
    resumed = tiny_sims(tiny)
    resumed.state = restore_state(folder, resumed.config, resumed.model, resumed.tokenizer)
    resumed.callbacks = [RunWriter(folder, resumed.model)]
    results = list(resumed.iterate())
    assert [r.iteration for r in results] == [2]
    assert (out / "steering" / "iter_001.safetensors").read_bytes() == first
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["iteration"] for s in samples}) == [1, 2] and len(samples) == 2 * 4 * 3
    assert set(samples[0]) >= {"iteration", "prompt_id", "prompt", "response", "reward", "label"}
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["iteration", "split", "metric", "layer", "value"]
    assert {r["iteration"] for r in rows} == {"0", "1", "2"}
    assert sum(r["metric"] == "reward_mean" and r["split"] == "heldout" for r in rows) == 3
    policy = load_steering(out / "steering" / "iter_002.safetensors", resumed.model)
    assert policy.iteration == 2
    assert RunFolder(out).read_state()["layers"] == [0, 1]


def test_existing_folder_without_resume_and_changed_config_are_refused(tiny, tmp_path: Path):
    sims = tiny_sims(tiny)
    open_run(tmp_path / "r", sims.config, resume=False)
    with pytest.raises(RunFolderError, match="--resume"):
        open_run(tmp_path / "r", sims.config, resume=False)
    changed = load_config(None, ['learner="pca"'])
    with pytest.raises(RunFolderError, match="changed"):
        open_run(tmp_path / "r", changed, resume=True)
    with pytest.raises(RunFolderError, match=r"no config\.toml"):
        open_run(tmp_path / "empty", None, resume=True)


def test_reference_oracle_agreement_is_logged(tiny):
    sims = tiny_sims(tiny, iterations=1)
    sims.reference = LetterOracle()
    [result] = list(sims.iterate())
    rows = [r for r in result.metrics if r["metric"] == "oracle_agreement"]
    assert len(rows) == 1 and rows[0]["value"] == pytest.approx(1.0)
    assert all(s.reference_reward == s.reward for s in result.samples)


@dataclass
class RelativeOracle:
    """Scores only make sense within a group: rank minus the group's mean rank (sums to zero)."""

    name: str = "relative"

    def score(self, prompts, responses):
        out = []
        for group in responses:
            order = sorted(range(len(group)), key=lambda i: LetterOracle().score([""], [[group[i]]])[0][0])
            ranks = [0.0] * len(group)
            for rank, i in enumerate(order):
                ranks[i] = rank - (len(group) - 1) / 2
            out.append(ranks)
        return out


def test_win_rate_ranks_policy_and_base_together(tiny):
    from sims_lens.evaluation import Evaluation, head_to_head

    def evaluation(responses):
        return Evaluation(["h0"] * 2 + ["h1"] * 2, responses, [Exchange((1,), (2,))] * 4, [0.0] * 4, [1.0] * 4)

    base = evaluation(["xx", "xy", "zz", "zz"])
    policy = evaluation(["eee", "eex", "eee", "x"])
    # within separate groups the relative scores of policy and base would look alike; together the policy wins
    assert head_to_head(RelativeOracle(), HELDOUT, policy, base, 2) == pytest.approx(0.75)
    assert head_to_head(LetterOracle(), HELDOUT, policy, base, 2) == pytest.approx(0.75)


def test_reference_oracle_is_scored_on_heldout(tiny):
    sims = tiny_sims(tiny, iterations=1)
    sims.reference = RelativeOracle()
    [result] = list(sims.iterate())
    assert result.heldout.reference_rewards is not None
    assert any(r["metric"] == "reference_reward_mean" for r in result.metrics)


def test_a_torn_last_line_does_not_block_resume(tmp_path: Path):
    folder = RunFolder(tmp_path)
    folder.append_samples([{"iteration": 1, "x": 1}, {"iteration": 2, "x": 2}])
    with (tmp_path / "samples.jsonl").open("a") as fh:
        fh.write('{"iteration": 2, "respo')
    folder.truncate_after(1)
    assert folder.read_samples() == [{"iteration": 1, "x": 1}]


def test_resid_mid_is_refused_for_steering(tiny):
    from sims_lens.steering.functions import SteeringFunction, SteeringSet
    from sims_lens.steering.hooks import apply_steering

    model, _ = tiny
    steer = SteeringSet.from_functions([SteeringFunction("add", "blocks.0.hook_resid_mid", {"vector": torch.ones(64)})])
    with pytest.raises(ValueError, match="never reaches the residual stream"), apply_steering(model, steer):
        pass
