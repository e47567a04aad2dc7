"""The analysis package: geometry, figures, logit lens, live callback, report, ablations (tiny model)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.ablation_figures import layer_sweep_figure
from analysis.ablations import SWEEP_COLUMNS, ablate, ablation_variants, layer_sweep
from analysis.figures import (
    FIGURES,
    cosine_iterations_figure,
    cosine_layers_figure,
    drift_figure,
    heldout_figure,
    norms_figure,
    separability_figure,
)
from analysis.geometry import cosine, direction_norms, drift, geometry_rows, iteration_cosines, layer_cosines
from analysis.live import LiveAnalysis
from analysis.logit_lens import direction_logits, lens_rows, logit_lens, steering_lens
from analysis.report import report, summary_table
from analysis.run_data import load_run
from analysis.watch import refresh
from sims_lens.generation import GenerationSettings
from sims_lens.prompts import Prompt
from sims_lens.separability import separability_by_hook
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from tests.helpers import HELDOUT, LetterOracle, tiny_sims

S2 = 1 / math.sqrt(2)
E0, E1, E2 = torch.eye(4)[0], torch.eye(4)[1], torch.eye(4)[2]


def steering(iteration: int, vectors: dict[int, torch.Tensor], multiplier: float = 1.0) -> SteeringSet:
    fns = [
        SteeringFunction("add", f"blocks.{layer}.hook_resid_post", {"vector": v.clone()}, multiplier=multiplier)
        for layer, v in vectors.items()
    ]
    return SteeringSet.from_functions(fns, iteration=iteration)


@pytest.fixture
def policies() -> dict[int, SteeringSet]:
    """Layer 0 turns from e0 to e1 in two 45-degree steps; layer 3 flips sign and doubles via its multiplier."""
    return {
        1: steering(1, {0: E0, 3: E1}),
        2: steering(2, {0: E0 + E1, 3: -E1}),
        3: steering(3, {0: E1, 3: -E1}, multiplier=2.0),
    }


# -- geometry ---------------------------------------------------------------------------------


def test_iteration_cosines_are_the_known_angles(policies):
    frame = iteration_cosines(policies, 0)
    assert list(frame.index) == [1, 2, 3] and list(frame.columns) == [1, 2, 3]
    expected = [[1, S2, 0], [S2, 1, S2], [0, S2, 1]]
    np.testing.assert_allclose(frame.to_numpy(), expected, atol=1e-6)
    by_hook = iteration_cosines(policies, "blocks.3.hook_resid_post").to_numpy()
    np.testing.assert_allclose(by_hook, [[1, -1, -1], [-1, 1, 1], [-1, 1, 1]], atol=1e-6)


def test_layer_cosines_within_one_iteration(policies):
    first = layer_cosines(policies[1])
    assert list(first.index) == [0, 3]
    np.testing.assert_allclose(first.to_numpy(), [[1, 0], [0, 1]], atol=1e-6)
    assert layer_cosines(policies[2]).loc[0, 3] == pytest.approx(-S2)


def test_drift_curves_and_norms(policies):
    frame = drift(policies)
    layer0 = frame[frame["layer"] == 0].pivot(index="iteration", columns="metric", values="value")
    assert math.isnan(layer0.loc[1, "cos_prev"])
    assert layer0["cos_prev"].iloc[1:].tolist() == pytest.approx([S2, S2])
    assert layer0["cos_first"].tolist() == pytest.approx([1, S2, 0], abs=1e-6)
    assert layer0["cos_final"].tolist() == pytest.approx([0, S2, 1], abs=1e-6)
    norms = direction_norms(policies).set_index(["iteration", "layer"])["value"]
    assert norms[(2, 0)] == pytest.approx(math.sqrt(2))
    assert norms[(3, 3)] == pytest.approx(2.0)  # the multiplier is folded into the direction


def test_cosine_of_a_zero_vector_is_nan_and_geometry_rows(policies):
    assert math.isnan(cosine(torch.zeros(4), E0))
    rows = geometry_rows(2, policies[2], previous=policies[1], first=policies[1], fit=policies[2])
    got = {(r["metric"], r["layer"]): r["value"] for r in rows}
    assert got[("cos_prev", 0)] == pytest.approx(S2) and got[("cos_first", 3)] == pytest.approx(-1)
    assert got[("norm", 0)] == pytest.approx(math.sqrt(2)) and ("update_cos_prev", 0) not in got
    assert {r["split"] for r in rows} == {"analysis"}


def test_separability_per_layer():
    torch.manual_seed(0)
    pos = torch.randn(12, 2, 8)
    neg = torch.randn(12, 2, 8)
    pos[:, 1, 0] += 10.0  # layer 5 separates perfectly along one axis, layer 2 not at all
    hooks = ["blocks.2.hook_resid_post", "blocks.5.hook_resid_post"]
    measured = separability_by_hook(pos, neg, hooks, [f"prompt{i // 2}" for i in range(12)], seed=0)
    low, high = measured[hooks[0]], measured[hooks[1]]
    assert high.probe_accuracy == 1.0 and high.fisher_ratio > low.fisher_ratio
    assert high.probe_accuracy_null < high.probe_accuracy
    with pytest.raises(ValueError, match="paired"):
        separability_by_hook(pos, neg, hooks[:1], None, seed=0)
    with pytest.raises(ValueError, match="paired"):
        separability_by_hook(pos, neg[:11], hooks, None, seed=0)
    one_prompt = separability_by_hook(pos, neg, hooks, ["one prompt"] * 12, seed=0)
    assert all(math.isnan(v) for sep in one_prompt.values() for v in vars(sep).values())


# -- figures ----------------------------------------------------------------------------------


def metrics_frame() -> pd.DataFrame:
    rows = [(0, "heldout", m, None, v) for m, v in [("reward_mean", 0.3), ("perplexity_under_base", 8.0)]]
    rows += [(0, "heldout", "response_length", None, 40.0)]
    for t in (1, 2):
        rows += [(t, "heldout", "reward_mean", None, 0.3 + 0.2 * t), (t, "heldout", "win_rate_vs_base", None, 0.7)]
        rows += [(t, "heldout", "perplexity_under_base", None, 8.5), (t, "heldout", "response_length", None, 39.0)]
        rows += [(t, "train", "probe_accuracy", layer, 0.6) for layer in (0, 3)]
        rows += [(t, "train", "fisher_ratio", layer, 1.5) for layer in (0, 3)]
    return pd.DataFrame(rows, columns=["iteration", "split", "metric", "layer", "value"])


def test_geometry_figures_have_one_trace_per_layer_or_iteration(policies):
    fig = cosine_iterations_figure(policies)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    assert [t.visible for t in fig.data] == [True, False] and len(fig.layout.updatemenus[0].buttons) == 2
    assert fig.data[0].z.shape == (3, 3)
    layers = cosine_layers_figure(policies)
    assert len(layers.data) == 3 and layers.data[2].visible and layers.data[0].z.shape == (2, 2)
    drift_fig = drift_figure(policies)
    assert len(drift_fig.data) == 3 * 2 and {t.name for t in drift_fig.data} == {"layer 0", "layer 3"}
    norms = norms_figure(policies, policies)
    assert len(norms.data) == 2 * 2 and list(norms.data[0].y) == pytest.approx([1, math.sqrt(2), 2])


def test_metric_figures_and_empty_inputs(policies):
    fig = heldout_figure(metrics_frame())
    assert [t.name for t in fig.data].count("policy") == 4
    reward = fig.data[0]
    assert list(reward.x) == [0, 1, 2] and list(reward.y) == pytest.approx([0.3, 0.5, 0.7])
    base = fig.data[1]
    assert base.name == "base (iteration 0)" and list(base.y) == [0.3, 0.3] and base.line.dash == "dash"
    sep = separability_figure(metrics_frame())  # an older run: no null rows
    assert len(sep.data) == 2 * 2 and list(sep.data[0].x) == [0, 3] and "older run" in sep.layout.title.text
    nulls = [(t, "train", "probe_accuracy_null", layer, 0.5) for t in (1, 2) for layer in (0, 3)]
    with_null = pd.concat([metrics_frame(), pd.DataFrame(nulls, columns=metrics_frame().columns)])
    sep = separability_figure(with_null)
    dashed = [t for t in sep.data if t.line.dash == "dash"]
    assert len(sep.data) == 2 * 2 + 2 + 1  # accuracy and Fisher per iteration, a null per iteration, the legend
    assert [t.name for t in dashed] == ["iteration 1 null", "iteration 2 null", "null"]
    assert dashed[0].line.color == sep.data[0].line.color and list(dashed[0].y) == [0.5, 0.5]
    assert "cross-validated, grouped by prompt" in sep.layout.title.text
    empty = pd.DataFrame(columns=["iteration", "split", "metric", "layer", "value"])
    assert len(heldout_figure(empty).data) == 0 and len(cosine_iterations_figure({}).data) == 0


# -- logit lens -------------------------------------------------------------------------------


def test_logit_lens_reads_k_tokens_and_negation_swaps_the_sides(tiny):
    model, tok = tiny
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    plus, minus = logit_lens(model, v, k=5, tokenizer=tok), logit_lens(model, -v, k=5, tokenizer=tok)
    assert len(plus.promoted) == len(plus.suppressed) == 5
    assert all(isinstance(token, str) for token, _ in plus.promoted)
    assert [t for t, _ in plus.promoted] == [t for t, _ in minus.suppressed]
    assert [t for t, _ in plus.suppressed] == [t for t, _ in minus.promoted]
    assert [v for _, v in plus.promoted] == pytest.approx([-v for _, v in minus.suppressed], rel=1e-4)
    values = [v for _, v in plus.promoted]
    assert values == sorted(values, reverse=True) and plus.promoted[0][1] > plus.suppressed[0][1]


def test_logit_lens_through_unembed_matches_w_u_and_ignores_biases(tiny):
    model, tok = tiny

    class NoWU:  # a model that only offers the unembedding module
        ln_final, unembed = model.ln_final, model.unembed

        def parameters(self):
            return model.parameters()

    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(direction_logits(NoWU(), v), direction_logits(model, v), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(direction_logits(model, 3 * v), direction_logits(model, v), atol=1e-4, rtol=1e-4)
    raw = direction_logits(model, v, apply_ln=False)
    torch.testing.assert_close(raw, v @ model.W_U.detach().float(), atol=1e-4, rtol=1e-4)
    table = steering_lens(model, steering(1, {0: v, 1: -v}), k=3, tokenizer=tok)
    assert len(table) == 2 * 2 * 3 and set(table["side"]) == {"promoted", "suppressed"}


def test_directions_read_together_equal_each_read_alone(tiny):
    """The batched read (one product with W_U for every observed layer) gives each direction's own logits."""
    model, tok = tiny
    vs = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(3)) * torch.tensor([[0.1], [1], [9]])
    together = direction_logits(model, vs)
    assert together.shape == (3, model.cfg.d_vocab)
    for i in range(3):
        torch.testing.assert_close(together[i], direction_logits(model, vs[i]), atol=1e-5, rtol=1e-5)
    rows = lens_rows(model, 1, {f"blocks.{i}.hook_resid_post": vs[i] for i in range(3)}, k=4, tokenizer=tok)
    for i in range(3):
        alone = logit_lens(model, vs[i], k=4, tokenizer=tok)
        mine = rows[(rows["layer"] == i) & (rows["sign"] == "promoted")].sort_values("rank")
        assert list(mine["token"]) == [t for t, _ in alone.promoted]
    assert lens_rows(model, 1, {}, tokenizer=tok).empty


# -- the live callback and the report on a tiny two-iteration run ------------------------------


TRAIN = [
    Prompt(f"t{i}", text)
    for i, text in enumerate(
        ["Tell me a story", "What is the sea?", "Write a short poem", "How do I cook rice?", "Explain gravity"]
    )
]


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    """A finished two-iteration run folder written with the live analysis callback, and its results."""
    out = tmp_path_factory.mktemp("analysis") / "run"
    sims = tiny_sims(tiny, prompts=TRAIN, batch_size=12, out=out, validation_size=1)  # five prompts of its own
    sims.callbacks.append(LiveAnalysis(out))
    results = list(sims.iterate())
    return out, results


def test_live_callback_writes_analysis_metrics_and_figures(tiny_run):
    out, results = tiny_run
    assert [r.iteration for r in results] == [1, 2]
    frame = pd.read_csv(out / "analysis_metrics.csv")
    assert list(frame.columns) == ["iteration", "split", "metric", "layer", "value"]
    assert (
        set(frame["split"]) == {"analysis"}
        and set(frame["iteration"]) == {1, 2}
        and set(frame["layer"].dropna()) == {0, 1}
    )
    expected = {"norm", "cos_prev", "cos_first", "fit_norm", "probe_accuracy", "probe_accuracy_null", "fisher_ratio"}
    assert expected <= set(frame["metric"])
    # every observed layer (the loop observes all layers by default): candidate direction and separability
    candidate = frame[frame["metric"].isin(["candidate_norm", "candidate_cos_first", "probe_accuracy"])]
    assert set(zip(candidate["iteration"], candidate["layer"], strict=True)) == {
        (t, layer) for t in (1, 2) for layer in (0, 1)
    }
    assert set(frame[frame["iteration"] == 2]["metric"]) >= {"candidate_cos_prev", "candidate_cos_steered"}
    cos_prev = frame[(frame["metric"] == "cos_prev") & (frame["layer"] == 0)]["value"].item()
    expected = cosine(
        results[1].policy.direction("blocks.0.hook_resid_post"), results[0].policy.direction("blocks.0.hook_resid_post")
    )
    assert cos_prev == pytest.approx(expected, abs=1e-6)
    index = (out / "figures" / "index.html").read_text()
    assert "iterations done: <b>2</b> of 2" in index
    for name in [*FIGURES, "logit_lens"]:
        assert f'href="{name}.html"' in index and (out / "figures" / f"{name}.html").is_file()
    assert (out / "figures" / "plotly.min.js").is_file()  # pages open offline
    assert "cdn.plot.ly" not in (out / "figures" / "heldout.html").read_text()


def test_report_regenerates_from_the_folder_alone(tiny_run, tmp_path):
    out, results = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "figures")
    (copy / "analysis_metrics.csv").unlink()
    index = report(copy)
    assert index == copy / "figures" / "index.html" and index.is_file()
    rebuilt = pd.read_csv(copy / "analysis_metrics.csv")
    live = pd.read_csv(out / "analysis_metrics.csv")
    keys = ["iteration", "metric", "layer"]
    merged = rebuilt.merge(live, on=keys, suffixes=("_report", "_live"))
    assert len(merged) == len(rebuilt) > 0  # geometry rows agree with what the callback wrote
    assert merged["value_report"].to_numpy() == pytest.approx(merged["value_live"].to_numpy(), abs=1e-6)
    table = summary_table(copy)
    assert list(table.index) == [0, 1, 2]
    assert list(table.columns) == ["reward_mean", "win_rate_vs_base", "perplexity_under_base", "response_length"]
    assert table.loc[2, "reward_mean"] == pytest.approx(results[1].heldout.reward_mean)
    data = load_run(copy)
    assert sorted(data.policies) == [1, 2] and sorted(data.fits) == [1, 2]


def test_report_with_the_model_reads_the_logit_lens_of_every_observed_layer(tiny, tiny_run, tmp_path):
    model, tok = tiny
    out, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "logit_lens.csv").unlink(missing_ok=True)  # as if the live callback had no model
    index = report(copy, model, tok)
    lens = pd.read_csv(copy / "logit_lens.csv", keep_default_na=False)
    assert list(lens.columns) == ["iteration", "layer", "direction", "rank", "sign", "token", "logit"]
    assert set(lens["iteration"]) == {1, 2} and set(lens["layer"]) == {0, 1} and len(lens) == 2 * 2 * 2 * 5
    assert 'class="lens"' in index.read_text() and (copy / "figures" / "logit_lens.html").is_file()


def test_report_of_a_partial_run_skips_an_unfinished_iteration(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "state.json").write_text(json.dumps({"completed_iterations": 1}))
    data = load_run(copy)
    assert sorted(data.policies) == [1] and set(data.metrics["iteration"]) == {0, 1}
    assert "iterations done: <b>1</b>" in report(copy).read_text()


def test_report_errors_and_the_cli(tiny_run, tmp_path, capsys):
    from sims_lens.cli import main

    out, _ = tiny_run
    with pytest.raises(ValueError, match="does not exist"):
        report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"metrics\.csv"):
        summary_table(tmp_path / "empty")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "error: run folder" in capsys.readouterr().err
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reward_mean" in printed and "index.html" in printed


def test_live_callback_swallows_failures_with_one_warning_line(tiny_run, tmp_path, monkeypatch, capsys):
    _, results = tiny_run

    def broken(*args, **kwargs):
        raise RuntimeError("no figures today\nsecond line")

    monkeypatch.setattr("analysis.live.write_index", broken)
    live = LiveAnalysis(tmp_path / "elsewhere")
    for result in results:
        live.on_iteration(result)  # must not raise
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("warning: analysis") and "no figures today" in line for line in err)
    assert set(pd.read_csv(tmp_path / "elsewhere" / "analysis_metrics.csv")["iteration"]) == {1, 2}

    class Broken:
        iteration, policy, fitted, metrics = 1, None, None, []

    LiveAnalysis(tmp_path / "x", figures=False).on_iteration(Broken())
    assert capsys.readouterr().err.count("warning:") == 1


def test_live_callback_without_a_run_writer_draws_from_memory(tiny_run, tmp_path):
    _, results = tiny_run
    live = LiveAnalysis(tmp_path / "memory")
    for result in results:
        live.on_iteration(result)
    index = (tmp_path / "memory" / "figures" / "index.html").read_text()
    assert "iterations done: <b>2</b>" in index
    html = (tmp_path / "memory" / "figures" / "cosine_iterations.html").read_text()
    assert "layer 0" in html and "layer 1" in html


# -- ablations --------------------------------------------------------------------------------


def test_ablation_variants(policies):
    names = [v.name for v in ablation_variants(policies[1], multipliers=(0.5, 1.0, 2.0))]
    assert names == [
        "base",
        "all",
        "only layer 0",
        "only layer 3",
        "without layer 0",
        "without layer 3",
        "all x0.5",
        "all x2",
    ]
    single = ablation_variants(steering(1, {5: E0}), multipliers=(2.0,))
    assert [v.name for v in single] == ["base", "all", "all x2"] and single[2].layers == "5"


def test_ablate_on_the_tiny_model(tiny, tiny_run):
    model, tok = tiny
    _, results = tiny_run
    settings = GenerationSettings(max_new_tokens=3, temperature=1.0, top_p=1.0, batch_size=8)
    table = ablate(
        model, tok, results[-1].policy, HELDOUT[:1], LetterOracle(), settings, multipliers=(0.0,), samples_per_prompt=2
    )
    assert list(table["variant"]) == [
        "base",
        "all",
        "only layer 0",
        "only layer 1",
        "without layer 0",
        "without layer 1",
        "all x0",
    ]
    rows = table.set_index("variant")
    assert rows.loc["base", "win_rate_vs_base"] == 0.5
    # multiplier 0 is the identity: same seed, same responses, same scores as the base model
    assert rows.loc["all x0", "reward_mean"] == rows.loc["base", "reward_mean"]
    assert rows.loc["all x0", "win_rate_vs_base"] == 0.5
    assert rows.loc["only layer 0", "layers"] == "0" and rows.loc["all", "layers"] == "0,1"


def test_layer_sweep_of_a_run_folder(tiny, tiny_run, monkeypatch):
    model, tok = tiny
    out, results = tiny_run
    table = layer_sweep(
        model,
        tok,
        out,
        prompts=HELDOUT[:1],
        multipliers=(0.0, 1.0),
        samples_per_prompt=1,
        max_new_tokens=3,
        oracle=LetterOracle(),
    )
    assert list(table.columns) == SWEEP_COLUMNS and len(table) == 1 + 2 * 2
    assert table["variant"].iloc[0] == "base" and set(table["layer"].dropna()) == {0, 1}
    identity = table[table["multiplier"] == 0.0]  # multiplier 0 is the base model (same seed)
    assert (identity["reward_mean"] == table["reward_mean"].iloc[0]).all()
    norms = results[-1].policy.norms().values()
    steered = table[table["multiplier"] == 1.0]
    assert steered["norm"].to_numpy() == pytest.approx([sum(norms) / len(norms)] * 2, rel=1e-4)
    analysis = pd.read_csv(out / "analysis_metrics.csv")
    live = analysis[(analysis["iteration"] == 2) & (analysis["metric"] == "probe_accuracy")].set_index("layer")
    for row in steered.itertuples():
        assert row.probe_accuracy == pytest.approx(live.loc[int(row.layer), "value"])
    fig = layer_sweep_figure(table)
    assert len([t for t in fig.data if t.type == "bar"]) == 1
    monkeypatch.setattr("analysis.ablations.observed_iterations", lambda path: [])
    with pytest.raises(ValueError, match="observed activations"):
        layer_sweep(model, tok, out, prompts=HELDOUT[:1], oracle=LetterOracle())


def test_refresh_reads_a_run_folder_without_writing(tiny_run):
    out, _ = tiny_run
    before = sorted(p.name for p in out.rglob("*"))
    snap = refresh(out, names=["heldout", "separability_layers"])
    assert snap.completed == 2 and snap.total == 2 and not snap.running and snap.done
    assert list(snap.heldout.index) == [0, 1, 2] and list(snap.figures) == ["heldout", "separability_layers"]
    assert snap.figures["separability_layers"].data[0].z.shape == (2, 2)  # 2 layers x 2 iterations
    assert sorted(snap.observed) == [1, 2] and refresh(out, names=[], previous=snap).observed.keys() == {1, 2}
    assert sorted(p.name for p in out.rglob("*")) == before
    with pytest.raises(ValueError, match="does not exist"):
        refresh(out / "missing", tries=1)


def test_notebooks_are_stored_without_outputs():
    folder = Path(__file__).resolve().parents[2] / "notebooks"
    names = sorted(p.name for p in folder.glob("*.ipynb"))
    assert names == ["01_quickstart.ipynb", "02_directions.ipynb", "03_ablations.ipynb", "04_your_own_pairs.ipynb"]
    for name in names:
        notebook = json.loads((folder / name).read_text())
        assert notebook["nbformat"] == 4
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, name
                compile("".join(cell["source"]), name, "exec")  # valid Python, no IPython magics
