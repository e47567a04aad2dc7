"""``sims-lens eval`` on tiny runs: every policy and baseline, tidy intervals, pooled seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sims_lens.baselines import pairs_applied_by
from sims_lens.differences import DIFFERENCE_COLUMNS
from sims_lens.eval_runs import (
    BASELINES,
    EVAL_COLUMNS,
    Answers,
    EvalSettings,
    _best_of_k,
    best_of_k_choice,
    evaluate_runs,
)
from sims_lens.kl import best_of_k_kl
from sims_lens.prompts import Prompt
from sims_lens.run import RunWriter
from sims_lens.run_folder import RunFolder, open_run
from tests.helpers import FakeRelevance, LetterOracle, make_run, tiny_sims


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    runs = [make_run(tiny, root / f"seed_{s}", s) for s in (0, 1)]
    model, tok = tiny
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"h{i}", "prompt": t}) + "\n" for i, t in enumerate(["Hi", "Why?"])))
    settings = EvalSettings(prompts=str(prompts), samples=2, n_boot=200, multipliers=(2.0,))
    frame = evaluate_runs(runs, root / "out", model, tok, settings, oracle=LetterOracle(), relevance=FakeRelevance())
    return frame, root / "out"


def test_every_policy_and_baseline_is_evaluated_with_intervals(evaluated):
    frame, out = evaluated
    assert list(frame.columns) == EVAL_COLUMNS
    assert list(pd.read_csv(out / "eval.csv").columns) == EVAL_COLUMNS
    policies = set(frame["policy"])
    assert {"base", "iter_001", "iter_002", *BASELINES} <= policies
    for metric in ["reward", "relevance", "perplexity_under_base", "response_length", "distinct_2"]:
        assert set(frame[frame["metric"] == metric]["policy"]) == policies, metric
    assert "base" not in set(frame[frame["metric"] == "win_rate_vs_base"]["policy"])
    finite = frame.dropna(subset=["value"])
    assert (finite["ci_low"] <= finite["value"] + 1e-9).all() and (finite["value"] <= finite["ci_high"] + 1e-9).all()
    cost = frame[frame["metric"] == "samples_per_answer"].set_index(["policy", "run"])["value"]
    assert cost[("best_of_k", "all")] == 3 and cost[("base", "all")] == 1  # K = samples_per_prompt = 3


def test_pooled_rows_cover_both_seeds_and_changes_are_paired(evaluated):
    frame, _ = evaluated
    assert set(frame["run"]) == {"seed_0", "seed_1", "all"}
    assert set(frame[frame["run"] == "all"]["seed"].astype(str)) <= {"", "nan"}
    changes = frame[(frame["metric"] == "reward_change") & (frame["run"] == "all")]
    assert list(changes["policy"]) == ["iter_001", "iter_002"]
    pivot = frame[(frame["metric"] == "reward") & (frame["run"] == "all")].set_index("policy")["value"]
    assert changes.iloc[0]["value"] == pytest.approx(pivot["iter_001"] - pivot["base"])


def test_static_first_is_iteration_one_under_accumulate(evaluated):
    frame, _ = evaluated
    rows = frame[frame["metric"].isin(["reward", "perplexity_under_base"])].set_index(["policy", "run", "metric"])
    for run in ("seed_0", "seed_1"):
        for metric in ("reward", "perplexity_under_base"):
            assert rows.loc[("static_first", run, metric), "value"] == pytest.approx(
                rows.loc[("iter_001", run, metric), "value"]
            )


def test_samples_file_has_every_response_with_its_scores(evaluated):
    frame, out = evaluated
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    n_policies = len(set(frame[frame["run"] == "seed_0"]["policy"]))
    assert len(records) == 2 * n_policies * 2 * 2  # runs x policies x prompts x samples
    assert {"policy", "run", "seed", "prompt_id", "sample", "response", "reward", "relevance", "nll"} <= set(records[0])


def test_best_of_k_keeps_the_oracles_first_choice():
    assert best_of_k_choice([0.1, 0.9, 0.3]) == 1
    assert best_of_k_choice([0.5, 0.5, 0.2]) == 0  # ties: the first

    class Pool:
        def __call__(self, policy, steering, system=None, repeats=1, stream=""):
            texts = [["eee", "x", "ee", "xyz"]]  # one prompt, 2 answers x K=2 candidates
            return Answers(policy, texts, [[None] * 4])  # type: ignore[list-item]

    chosen = _best_of_k(Pool(), LetterOracle(), [Prompt("p", "q")], k=2)  # type: ignore[arg-type]
    assert chosen.responses == [["eee", "ee"]] and chosen.samples_per_answer == 2


def test_runs_that_differ_in_more_than_the_seed_are_not_pooled(tiny, tmp_path: Path):
    a = make_run(tiny, tmp_path / "a", 0)
    sims = tiny_sims(tiny, seed=1, multiplier=2.0)
    folder, _, _ = open_run(tmp_path / "b", sims.config, resume=False)
    sims.callbacks = [RunWriter(folder, sims.model)]
    list(sims.iterate())
    with pytest.raises(ValueError, match=r"differs .* in multiplier"):
        _pool(tiny, [a, tmp_path / "b"], tmp_path / "out")


def _pool(tiny, runs, out):
    """``evaluate_runs`` of several run folders with the deterministic oracles."""
    model, tok = tiny
    return evaluate_runs(runs, out, model, tok, EvalSettings(), oracle=LetterOracle(), relevance=FakeRelevance())


def test_norm_matched_baselines_kl_and_multipliers(evaluated):
    frame, _ = evaluated
    policies = set(frame["policy"])
    assert {"static_first_matched@iter_001", "fresh_pairs@iter_001", "iter_002x2", "fresh_pairsx2"} <= policies
    assert "static_first_matchedx2" in policies
    kl = frame[(frame["metric"] == "kl_to_base") & (frame["run"] == "all")].set_index("policy")
    assert set(kl.index) == policies
    assert tuple(kl.loc["base", ["value", "ci_low", "ci_high"]]) == (0.0, 0.0, 0.0)
    assert kl.loc["best_of_k", "value"] == pytest.approx(best_of_k_kl(3))
    assert kl.loc["best_of_k", "ci_low"] == kl.loc["best_of_k", "ci_high"]
    assert kl["value"].notna().all()


def test_differences_file_has_per_run_and_pooled_rows(evaluated):
    _, out = evaluated
    diffs = pd.read_csv(out / "differences.csv")
    assert list(diffs.columns) == DIFFERENCE_COLUMNS
    pooled = diffs[~diffs["policy"].str.contains("/")]
    assert {"base", "static_first_matched", "fresh_pairs", "best_of_k"} <= set(
        pooled[pooled["policy"] == "iter_002"]["baseline"]
    )
    assert ("iter_001", "base") in set(zip(pooled["policy"], pooled["baseline"], strict=True))
    assert {"seed_0/iter_002", "seed_1/iter_002"} <= set(diffs["policy"])
    assert set(diffs["metric"]) >= {"reward", "relevance", "kl_to_base"}
    assert (diffs["ci_low"] <= diffs["value"] + 1e-9).all() and (diffs["value"] <= diffs["ci_high"] + 1e-9).all()


def test_when_every_fit_shares_one_direction_the_matched_first_fit_is_the_policy(tiny, tmp_path: Path):
    """A planted run: iteration t's policy is t x iteration 1's fit (only the norm grows)."""
    run = make_run(tiny, tmp_path / "run", 0)
    model, tok = tiny
    folder = RunFolder(run)
    first = folder.load_steering(1, "fit", model)
    for t in (1, 2):
        folder.save_steering(first, t, "fit", model)
        folder.save_steering(first.scaled(float(t)), t, "policy", model)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"h{i}", "prompt": t}) + "\n" for i, t in enumerate(["Hi", "Why?"])))
    settings = EvalSettings(prompts=str(prompts), samples=2, n_boot=100)
    frame = evaluate_runs(
        [run], tmp_path / "out", model, tok, settings, oracle=LetterOracle(), relevance=FakeRelevance()
    )
    rows = frame.set_index(["policy", "metric"])["value"]
    for metric in ("reward", "relevance", "perplexity_under_base", "kl_to_base", "response_length"):
        assert rows[("static_first_matched", metric)] == pytest.approx(rows[("iter_002", metric)], abs=1e-5), metric
    diffs = pd.read_csv(tmp_path / "out" / "differences.csv")
    same = diffs[(diffs["policy"] == "iter_002") & (diffs["baseline"] == "static_first_matched")]
    assert len(same) >= 3 and np.allclose(same[["value", "ci_low", "ci_high"]].to_numpy(), 0.0, atol=1e-5)


def test_a_rejected_iterations_pairs_are_not_counted(tiny, tmp_path: Path):
    run = make_run(tiny, tmp_path / "run", 0)
    folder = RunFolder(run)
    _, tok = tiny
    before = pairs_applied_by(folder, [1, 2], tok)
    records = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    for record in records:
        record["applied"] = record["update"] != 2  # as if the guard had rejected iteration 2
    (run / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    after = pairs_applied_by(folder, [1, 2], tok)
    assert after[1] == before[1] and after[2] == before[1] < before[2]


def test_runs_that_finished_different_iterations_are_not_pooled(tiny, tmp_path: Path):
    a = make_run(tiny, tmp_path / "a", 0)
    sims = tiny_sims(tiny, seed=1, iterations=1, out=tmp_path / "b")
    list(sims.iterate())
    with pytest.raises(ValueError, match=r"finished the same iterations \(a: 2, b: 1\)"):
        _pool(tiny, [a, tmp_path / "b"], tmp_path / "out")


def test_fresh_pairs_never_draw_validation_heldout_or_evaluated_prompts(tiny, tmp_path: Path):
    from sims_lens.baselines import fresh_prompts
    from tests.helpers import HELDOUT, TRAIN

    run = make_run(tiny, tmp_path / "run", 0)
    folder = RunFolder(run)
    config = folder.read_config()
    evaluated = [p for p in TRAIN if p.text == "Explain gravity"]
    pool = {p.text for p in fresh_prompts(folder, config, exclude=evaluated)}
    validation = {p.text for p in tiny_sims(tiny).validation_prompts}
    assert pool and pool.isdisjoint(validation | {p.text for p in HELDOUT} | {"Explain gravity"})
