"""Every layer observed at every iteration: candidates, separability, logit lens, figures, layer sweep, live callback.

Synthetic observed activations stand in for a run where the loop is not needed; the logit lens,
the layer sweep and the live callback run on the tiny random-weight model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.ablation_figures import layer_sweep_figure
from analysis.ablations import SWEEP_COLUMNS, sweep_layers
from analysis.figures import FIGURES, build_figures
from analysis.live import LiveAnalysis, live_callbacks, write_run_lens
from analysis.logit_lens import LENS_COLUMNS, direction_logits, lens_rows, logit_lens, read_lens, replace_lens
from analysis.observed import (
    OBSERVED_METRICS,
    candidate_cosines,
    candidates,
    observed_of,
    observed_rows,
    plane,
    summarize,
)
from analysis.observed_figures import (
    NO_OBSERVED,
    candidate_cosine_layers_figure,
    candidate_drift_figure,
    most_separable_layer,
    observed_scatter_figure,
    separability_layers_figure,
)
from analysis.pages import index_html, lens_table_html
from analysis.plots import MAX_TEXT_ROWS
from analysis.run_data import RunData
from sims_lens.activations import PairActivations
from sims_lens.generation import GenerationSettings
from sims_lens.metrics import tidy_metrics
from sims_lens.prompts import Prompt
from sims_lens.steering.functions import SteeringFunction, SteeringSet

S2 = 1 / math.sqrt(2)


def hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def synthetic_observed(
    iteration: int = 1,
    n_layers: int = 8,
    prompts: int = 12,
    pairs_per_prompt: int = 2,
    d: int = 16,
    planted: int | None = 5,
    shift: float = 6.0,
    seed: int = 0,
) -> PairActivations:
    """H+ and H- share a small per-prompt offset and differ only at ``planted`` (by ``shift`` along axis 0)."""
    g = torch.Generator().manual_seed(seed)
    n = prompts * pairs_per_prompt
    offsets = 0.5 * torch.randn(prompts, n_layers, d, generator=g)
    shared = offsets.repeat_interleave(pairs_per_prompt, dim=0)
    pos = shared + torch.randn(n, n_layers, d, generator=g)
    neg = shared + torch.randn(n, n_layers, d, generator=g)
    if planted is not None:
        pos[:, planted, 0] += shift
    groups = [f"p{i // pairs_per_prompt}" for i in range(n)]
    return Observed(iteration, [hook(layer) for layer in range(n_layers)], pos, neg, groups)


def Observed(iteration: int, hooks: list[str], pos: torch.Tensor, neg: torch.Tensor, prompt_ids) -> PairActivations:
    """Observed activations alone (no steered hooks), as a run folder keeps them."""
    return PairActivations(
        iteration, list(prompt_ids), observed_hooks=hooks, observed_positives=pos, observed_negatives=neg
    )


def exact_observed(iteration: int, vectors: list[torch.Tensor], layers: list[int], seed: int = 0) -> PairActivations:
    """H+ = H- + vectors[l] for every pair: the candidate at each layer is exactly that vector."""
    g = torch.Generator().manual_seed(seed)
    neg = torch.randn(6, len(layers), vectors[0].shape[0], generator=g)
    pos = neg + torch.stack(vectors)[None]
    return Observed(iteration, [hook(layer) for layer in layers], pos, neg, [f"p{i}" for i in range(6)])


# -- candidates, separability, the 2-D view ----------------------------------------------------


def test_a_difference_planted_at_one_layer_comes_out_as_the_most_separable():
    observed = synthetic_observed(planted=5)
    rows = observed_rows(observed, seed=0)
    assert {r["split"] for r in rows} == {"analysis"}
    [threshold] = [r["value"] for r in rows if r["layer"] is None]  # the family-wise row, over all 8 layers
    frame = pd.DataFrame([r for r in rows if r["layer"] is not None]).pivot(
        index="layer", columns="metric", values="value"
    )
    assert list(frame.index) == list(range(8))  # every observed layer; only the planted one beats the threshold
    assert [int(layer) for layer in frame.index[frame["probe_accuracy"] > threshold]] == [5]
    excess = frame["probe_accuracy"] - frame["probe_accuracy_null"]
    assert int(excess.idxmax()) == 5
    assert frame.loc[5, "probe_accuracy"] >= 0.85
    assert int(frame["fisher_ratio"].idxmax()) == 5
    assert int(frame["candidate_norm"].idxmax()) == 5
    # the same rows drive the figure's default layer and its heatmap
    metrics = tidy_metrics(pd.DataFrame(rows))
    assert most_separable_layer(metrics, 1) == 5
    heat = separability_layers_figure(metrics).data[0]
    assert heat.z.shape == (8, 1) and int(np.nanargmax(heat.z[:, 0])) == 5


def test_candidate_cosines_to_previous_first_and_steered_direction():
    e = torch.eye(4)
    first = exact_observed(1, [e[0], e[1]], [0, 3])
    second = exact_observed(2, [e[0] + e[1], -e[1]], [0, 3], seed=1)
    previous = summarize(first).by_hook()
    policy = SteeringSet.from_functions([SteeringFunction("add", hook(3), {"vector": 2 * e[1]})])
    rows = observed_rows(second, previous=previous, first=previous, policy=policy, seed=0)
    got = {(r["metric"], r["layer"]): r["value"] for r in rows}
    assert got[("candidate_norm", 0)] == pytest.approx(math.sqrt(2), abs=1e-5)
    assert got[("candidate_cos_prev", 0)] == pytest.approx(S2, abs=1e-5)
    assert got[("candidate_cos_first", 3)] == pytest.approx(-1, abs=1e-5)
    assert got[("candidate_cos_steered", 3)] == pytest.approx(-1, abs=1e-5)
    assert ("candidate_cos_steered", 0) not in got  # layer 0 is observed, not steered
    assert {m for m, layer in got if layer is not None} == set(OBSERVED_METRICS)
    assert {m for m, layer in got if layer is None} == {"probe_accuracy_threshold"}
    alone = observed_rows(first, seed=0)  # no previous iteration, no policy: those rows are left out
    assert {r["metric"] for r in alone if r["layer"] is not None} == set(OBSERVED_METRICS) - {
        "candidate_cos_prev",
        "candidate_cos_first",
        "candidate_cos_steered",
    }
    one_prompt = Observed(1, first.observed_hooks, first.observed_positives, first.observed_negatives, ["p"] * 6)
    nan = {r["metric"]: r["value"] for r in observed_rows(one_prompt, seed=0) if r["layer"] == 0}
    assert math.isnan(nan["probe_accuracy"]) and math.isnan(nan["fisher_ratio"]) and nan["candidate_norm"] > 0
    matrix = candidate_cosines(summarize(second))
    assert list(matrix.index) == [0, 3] and matrix.loc[0, 3] == pytest.approx(-S2, abs=1e-5)


def test_plane_puts_the_mean_difference_on_x():
    observed = synthetic_observed(planted=5)
    n = observed.n_pairs
    x, y = plane(observed.observed_positives[:, 5], observed.observed_negatives[:, 5])
    assert x.shape == y.shape == (2 * n,)
    norm = float(candidates(observed)[5].norm())
    assert float(x[:n].mean() - x[n:].mean()) == pytest.approx(norm, rel=1e-4)
    assert abs(float(x.mean())) < 1e-4 and abs(float(y.mean())) < 1e-4  # the cloud is centred
    assert float(y[:n].mean() - y[n:].mean()) == pytest.approx(0.0, abs=1e-4)  # y is orthogonal to it
    summary = summarize(observed)
    frame = summary.projection
    assert len(frame) == 8 * 2 * n and set(frame["side"]) == {"H+", "H-"}
    assert set(frame["prompt_id"]) == set(observed.prompt_ids) and summary.candidates.shape == (8, 16)


def test_observed_of_reads_an_iteration_result_and_checks_shapes():
    observed = synthetic_observed(n_layers=3, planted=2)
    result = FakeResult(4, SteeringSet(), SteeringSet(), activations=observed)
    got = observed_of(result)
    assert got is observed and got.n_pairs == 24
    assert observed_of(FakeResult(4, SteeringSet(), SteeringSet())) is None  # a loop that observes nothing
    with pytest.raises(ValueError, match="hook names"):
        Observed(
            1,
            observed.observed_hooks[:2],
            observed.observed_positives,
            observed.observed_negatives,
            observed.prompt_ids,
        )
    with pytest.raises(ValueError, match="prompt ids"):
        Observed(
            1,
            observed.observed_hooks,
            observed.observed_positives,
            observed.observed_negatives,
            observed.prompt_ids[:3],
        )


# -- the logit lens ------------------------------------------------------------------------------


def test_logit_lens_of_a_tokens_unembedding_column_ranks_that_token_first(tiny):
    model, tok = tiny
    w_u = model.W_U.detach().float()  # [d_model, d_vocab]
    j = int(w_u.norm(dim=0).argmax())  # the longest column: by Cauchy-Schwarz its own logit beats every other
    with torch.no_grad():  # the final norm's per-dimension gain (RMSNorm: its weight; ones have RMS 1)
        ones = torch.ones(1, 1, w_u.shape[0])
        gain = (model.ln_final(ones) - model.ln_final(torch.zeros_like(ones))).reshape(-1).float()
    v = w_u[:, j] / gain  # after the final norm, v points along token j's unembedding column
    assert int(direction_logits(model, v).argmax()) == j
    reading = logit_lens(model, v, k=5, tokenizer=tok)
    assert reading.promoted[0][0] == tok.decode([j])
    rows = lens_rows(model, 3, {hook(1): v}, k=5, tokenizer=tok)
    assert list(rows.columns) == LENS_COLUMNS and len(rows) == 2 * 5
    top = rows[(rows["sign"] == "promoted") & (rows["rank"] == 1)]
    assert top["token"].item() == tok.decode([j]) and top["layer"].item() == 1 and top["iteration"].item() == 3
    assert set(rows["direction"]) == {"candidate"} and sorted(set(rows["rank"])) == [1, 2, 3, 4, 5]
    promoted = rows[rows["sign"] == "promoted"]["logit"].to_numpy()
    suppressed = rows[rows["sign"] == "suppressed"]["logit"].to_numpy()
    assert (np.diff(promoted) <= 0).all() and (np.diff(suppressed) >= 0).all() and promoted[0] > suppressed[0]


def test_the_lens_csv_replaces_an_iterations_rows_and_keeps_tokens_verbatim(tmp_path):
    tokens = [" the", "", "nan", "NA", "a,b", 'q"u', "line\nbreak"]

    def frame(iteration: int, words: list[str]) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "iteration": iteration,
                    "layer": 2,
                    "direction": "candidate",
                    "rank": rank,
                    "sign": "promoted",
                    "token": word,
                    "logit": 1.0 / rank,
                }
                for rank, word in enumerate(words, start=1)
            ]
        )

    replace_lens(tmp_path, frame(1, tokens))
    back = read_lens(tmp_path)
    assert list(back.columns) == LENS_COLUMNS and list(back["token"]) == tokens
    replace_lens(tmp_path, frame(1, ["x", "y"]))  # the same iteration again: replaced, not appended
    replace_lens(tmp_path, frame(2, ["z"]))
    back = read_lens(tmp_path)
    assert list(back["iteration"]) == [1, 1, 2] and list(back["token"]) == ["x", "y", "z"]
    (tmp_path / "state.json").write_text(json.dumps({"completed_iterations": 1}))
    assert set(read_lens(tmp_path)["iteration"]) == {1}  # rows of an unfinished iteration are ignored
    assert read_lens(tmp_path / "nothing").empty


# -- figures of a long run: 30 layers, 12 iterations ---------------------------------------------

N_LAYERS, N_ITER, READABLE = 30, 12, 17


def long_metrics() -> pd.DataFrame:
    rows = [(0, "heldout", "reward_mean", None, 0.1)]
    for t in range(1, N_ITER + 1):
        rows.append((t, "heldout", "reward_mean", None, 0.1 + 0.02 * t))
        rows.append((t, "heldout", "win_rate_vs_base", None, 0.6))
        for layer in range(N_LAYERS):
            accuracy = 0.95 if layer == READABLE else 0.5 + 0.01 * (layer % 5)
            rows += [
                (t, "analysis", "probe_accuracy", layer, accuracy),
                (t, "analysis", "probe_accuracy_null", layer, 0.5),
                (t, "analysis", "fisher_ratio", layer, 3.0 if layer == READABLE else 0.1),
                (t, "analysis", "candidate_norm", layer, 1.0 + layer),
                (t, "analysis", "candidate_cos_first", layer, 1.0 if t == 1 else 0.8),
            ]
            if t > 1:
                rows.append((t, "analysis", "candidate_cos_prev", layer, 0.9))
    return tidy_metrics(pd.DataFrame(rows, columns=["iteration", "split", "metric", "layer", "value"]))


@pytest.fixture(scope="module")
def long_summaries():
    return {
        t: summarize(synthetic_observed(t, n_layers=N_LAYERS, prompts=3, d=8, planted=READABLE, seed=t))
        for t in range(1, N_ITER + 1)
    }


def long_lens() -> pd.DataFrame:
    rows = [
        {
            "iteration": t,
            "layer": layer,
            "direction": "candidate",
            "rank": rank,
            "sign": sign,
            "token": f"<b>{sign[0]}{layer}.{t}.{rank}" if rank == 1 else f" tok{rank}",
            "logit": (6 - rank) * (1 if sign == "promoted" else -1),
        }
        for t in range(1, N_ITER + 1)
        for layer in range(N_LAYERS)
        for sign in ("promoted", "suppressed")
        for rank in range(1, 6)
    ]
    return pd.DataFrame(rows, columns=LENS_COLUMNS)


def test_the_separability_heatmap_is_layer_by_iteration_without_cell_text():
    fig = separability_layers_figure(long_metrics())
    (heat,) = fig.data
    assert heat.type == "heatmap" and heat.z.shape == (N_LAYERS, N_ITER)
    assert heat.texttemplate is None  # 30 rows: values in the hover, not in the cells
    assert list(heat.y) == [str(layer) for layer in range(N_LAYERS)] and list(heat.x) == [str(t) for t in range(1, 13)]
    assert fig.layout.xaxis.type == "category" and fig.layout.yaxis.type == "category"
    assert int(np.argmax(heat.z[:, 0])) == READABLE and heat.z[READABLE, 0] == pytest.approx(0.45)
    assert np.asarray(heat.customdata).shape == (N_LAYERS, N_ITER, 2)
    assert "permutation null" in fig.layout.title.text and N_LAYERS * 20 <= fig.layout.height <= 1100
    small = long_metrics()
    small = small[(small["layer"].isna()) | (small["layer"] < 6)]
    small = small[small["iteration"] <= 3]
    assert separability_layers_figure(small).data[0].texttemplate == "%{z:.2f}"
    assert MAX_TEXT_ROWS >= 6
    # an older run: only the steered layers' train rows, no null
    old = pd.DataFrame(
        [(t, "train", "probe_accuracy", layer, 0.7) for t in (1, 2) for layer in (3, 9)],
        columns=["iteration", "split", "metric", "layer", "value"],
    )
    fig = separability_layers_figure(tidy_metrics(old))
    assert fig.data[0].z.shape == (2, 2) and "older run" in fig.layout.title.text
    assert fig.data[0].z[0, 0] == pytest.approx(0.2)


def test_the_separability_heatmap_stars_layers_above_the_family_wise_threshold():
    threshold = [(t, "analysis", "probe_accuracy_threshold", None, 0.9 if t < N_ITER else 0.97) for t in range(1, 13)]
    train = [(1, "train", "probe_accuracy_threshold", None, 0.4)]  # the loop's, over the steered layers only
    extra = pd.DataFrame(threshold + train, columns=["iteration", "split", "metric", "layer", "value"])
    fig = separability_layers_figure(tidy_metrics(pd.concat([long_metrics(), extra], ignore_index=True)))
    heat, stars = fig.data
    assert np.asarray(heat.customdata).shape == (N_LAYERS, N_ITER, 3)
    assert np.asarray(heat.customdata)[0, 0, 2] == pytest.approx(0.9) and "max over layers" in heat.hovertemplate
    # READABLE (0.95) beats 0.9 at every iteration but the last (0.97); no other layer (<= 0.54) beats it
    assert list(stars.y) == [str(READABLE)] * (N_ITER - 1) and list(stars.x) == [str(t) for t in range(1, N_ITER)]
    assert stars.mode == "markers" and "95% family-wise permutation threshold (max over layers)" in stars.name
    assert "family-wise" in fig.layout.title.text
    # no threshold rows of the shown split (older runs): no stars, whatever the train split has
    plain = separability_layers_figure(tidy_metrics(pd.concat([long_metrics(), extra.iloc[-1:]], ignore_index=True)))
    assert len(plain.data) == 1 and "family-wise" not in plain.layout.title.text


def test_candidate_drift_heatmaps_are_layer_by_iteration():
    fig = candidate_drift_figure(long_metrics())
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    prev, first = fig.data
    assert prev.z.shape == first.z.shape == (N_LAYERS, N_ITER)
    assert np.isnan(prev.z[:, 0]).all() and prev.z[0, 1] == pytest.approx(0.9)  # no previous at iteration 1
    assert first.z[0, 0] == pytest.approx(1.0) and prev.texttemplate is None
    assert fig.layout.coloraxis.cmin == -1 and fig.layout.coloraxis.cmax == 1


def test_candidate_layer_cosines_have_a_slider_over_iterations(long_summaries):
    fig = candidate_cosine_layers_figure(long_summaries)
    assert len(fig.data) == N_ITER and all(t.z.shape == (N_LAYERS, N_LAYERS) for t in fig.data)
    assert [t.visible for t in fig.data] == [False] * (N_ITER - 1) + [True]
    (slider,) = fig.layout.sliders
    assert len(slider.steps) == N_ITER and slider.active == N_ITER - 1
    assert slider.steps[0].args[0]["visible"] == [True] + [False] * (N_ITER - 1)
    assert all(t.texttemplate is None for t in fig.data)
    assert fig.layout.xaxis.type == "category"


def test_the_scatter_has_two_traces_per_layer_and_a_layer_dropdown(long_summaries):
    fig = observed_scatter_figure(long_summaries[N_ITER], default_layer=READABLE)
    assert len(fig.data) == 2 * N_LAYERS
    visible = [i for i, t in enumerate(fig.data) if t.visible]
    assert visible == [2 * READABLE, 2 * READABLE + 1]
    (menu,) = fig.layout.updatemenus
    assert len(menu.buttons) == N_LAYERS and menu.active == READABLE
    assert menu.buttons[3].args[0]["visible"] == [j // 2 == 3 for j in range(2 * N_LAYERS)]
    plus = fig.data[2 * READABLE]
    assert len(plus.x) == 6 and np.mean(plus.x) > np.mean(fig.data[2 * READABLE + 1].x)


def test_build_figures_of_a_long_run_and_of_an_older_run(tmp_path, long_summaries):
    data = RunData(tmp_path, metrics=long_metrics())
    figures = build_figures(data, observed=long_summaries)
    assert list(figures) == list(FIGURES)
    assert figures["separability_layers"].data[0].z.shape == (N_LAYERS, N_ITER)
    scatter = figures["observed_scatter"]  # the last iteration, at its most separable layer
    assert [i for i, t in enumerate(scatter.data) if t.visible] == [2 * READABLE, 2 * READABLE + 1]
    only = build_figures(data, observed=long_summaries, names=["candidate_drift"])
    assert list(only) == ["candidate_drift"]
    with pytest.raises(ValueError, match="unknown figure"):
        build_figures(data, observed={}, names=["nope"])
    old = RunData(tmp_path / "old")  # no observed activations, no metrics
    old_figures = build_figures(old, observed={})
    for name in ("candidate_drift", "candidate_cosine_layers", "observed_scatter"):
        assert len(old_figures[name].data) == 0
        assert old_figures[name].layout.annotations[0].text == NO_OBSERVED


def test_the_lens_table_and_the_index_summary(tmp_path):
    lens = long_lens()
    table = lens_table_html(lens, k=5)
    assert table.count("<tr><th>layer ") == N_LAYERS and table.count("<th>iteration ") == N_ITER
    assert "&lt;b&gt;p17.12.1" in table and "<b>p17" not in table  # tokens are escaped
    assert "␣tok2" in table  # a leading space is shown
    latest = lens_table_html(lens, iterations=[11, 12], k=3)
    assert latest.count("<th>iteration ") == 2 and "tok4" not in latest
    assert "No logit-lens readings" in lens_table_html(pd.DataFrame(columns=LENS_COLUMNS))
    data = RunData(tmp_path, config={"iterations": 12}, metrics=long_metrics())
    page = index_html(data, list(FIGURES), pd.DataFrame(), lens=lens)
    summary = page.index('id="summary-reward"'), page.index('id="summary-separability"'), page.index('class="lens"')
    assert summary == tuple(sorted(summary)) and page.index('class="lens"') < page.index("<h2>Figures</h2>")
    assert 'href="logit_lens.html"' in page and '<script src="plotly.min.js"></script>' in page
    assert "iteration 9</th>" in page and "iteration 8</th>" not in page  # the latest 4 iterations only


# -- the layer sweep -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny3():
    from sims_lens.tiny import tiny_model

    return tiny_model(n_layers=3, d_model=64, seed=0)


@dataclass
class ContainsOracle:
    """1 if a response holds ``target`` at least twice, else 0."""

    target: str
    name: str = "contains"

    def score(self, prompts, responses):
        return [[1.0 if r.count(self.target) >= 2 else 0.0 for r in group] for group in responses]


NEW_TOKENS = 3


def planted_directions(model: Any, tok: Any) -> tuple[torch.Tensor, list[torch.Tensor], str]:
    """A direction v whose logit-lens top token t (an ordinary token) is in no other direction's greedy text.

    Added with a huge norm, a direction dominates the residual stream, so greedy decoding repeats
    its logit-lens top token: v's text is t three times, the others' never contain t.
    """
    specials = set(tok.all_special_ids)

    def greedy_text(direction: torch.Tensor) -> tuple[int, str]:
        top = int(direction_logits(model, direction).argmax())
        text = "" if top in specials else tok.decode([top] * NEW_TOKENS, skip_special_tokens=True).strip()
        return top, text

    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        v, a, b = (torch.randn(model.cfg.d_model, generator=g) for _ in range(3))
        top, text = greedy_text(v)
        core = tok.decode([top]).strip()
        if top in specials or len(core) < 2 or "\ufffd" in core or text.count(core) < 2:
            continue
        if all(core not in greedy_text(other)[1] for other in (a, b)):
            return v, [a, b], core
    pytest.fail("no suitable planted direction among 200 seeds")


def test_the_layer_sweep_ranks_the_planted_layer_first(tiny3):
    model, tok = tiny3
    v, (a, b), core = planted_directions(model, tok)
    separability = pd.DataFrame(
        {"layer": [0, 1, 2], "probe_accuracy": [0.5, 0.9, 0.6], "probe_accuracy_null": [0.5] * 3, "fisher_ratio": 0.1}
    )
    table = sweep_layers(
        model,
        tok,
        {hook(0): a, hook(1): v, hook(2): b},
        [Prompt("h0", "Tell me about dogs"), Prompt("h1", "What is a poem?")],
        ContainsOracle(core),
        GenerationSettings(max_new_tokens=NEW_TOKENS, temperature=0.0, batch_size=8),
        norm=1e4,
        multipliers=(0.0, 1.0),
        samples_per_prompt=1,
        separability=separability,
    )
    assert list(table.columns) == SWEEP_COLUMNS and len(table) == 1 + 3 * 2
    base = table.iloc[0]
    assert base["variant"] == "base" and base["win_rate_vs_base"] == 0.5 and math.isnan(base["layer"])
    steered = table[table["multiplier"] == 1.0].sort_values("reward_mean", ascending=False, kind="stable")
    assert steered["layer"].iloc[0] == 1 and list(steered["reward_mean"]) == [1.0, 0.0, 0.0]
    assert steered["norm"].to_numpy() == pytest.approx([1e4] * 3, rel=1e-4)
    assert steered[steered["layer"] == 1]["win_rate_vs_base"].item() >= 0.5
    identity = table[(table["multiplier"] == 0.0) & table["layer"].notna()]  # multiplier 0 = the base model
    assert (identity["reward_mean"] == base["reward_mean"]).all()
    assert identity["perplexity_under_base"].to_numpy() == pytest.approx([base["perplexity_under_base"]] * 3)
    assert table[table["layer"] == 1]["probe_accuracy"].tolist() == [0.9, 0.9]


def test_the_layer_sweep_figure():
    rows = [{"variant": "base", "hook": "", "layer": math.nan, "multiplier": 0.0, "reward_mean": 0.2}]
    rows[0].update(perplexity_under_base=8.0, win_rate_vs_base=0.5)
    for m in (1.0, 2.0):
        for layer in range(N_LAYERS):
            rows.append(
                {
                    "variant": f"layer {layer} x{m:g}",
                    "hook": hook(layer),
                    "layer": layer,
                    "multiplier": m,
                    "reward_mean": 0.2 + 0.01 * layer * m,
                    "perplexity_under_base": 8.0 + m,
                    "win_rate_vs_base": 0.6,
                    "probe_accuracy": 0.7,
                    "probe_accuracy_null": 0.5,
                }
            )
    fig = layer_sweep_figure(pd.DataFrame(rows).reindex(columns=SWEEP_COLUMNS))
    lines = [t for t in fig.data if t.type == "scatter"]
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(lines) == 2 * 2 and len(bars) == 1  # reward and perplexity per multiplier, separability bars
    assert len(lines[0].x) == N_LAYERS and list(bars[0].y) == pytest.approx([0.2] * N_LAYERS)
    assert {t.name for t in lines} == {"x1", "x2"} and "readable" in fig.layout.title.text


# -- the live callback with the model ------------------------------------------------------------


@dataclass
class FakeResult:
    """The parts of an ``IterationResult`` the live analysis reads."""

    iteration: int
    policy: SteeringSet
    fitted: SteeringSet
    metrics: list[dict[str, Any]] = field(default_factory=list)
    activations: PairActivations = field(default_factory=lambda: PairActivations(0, []))


def fake_result(iteration: int, d_model: int, observed: bool = True) -> FakeResult:
    obs = synthetic_observed(iteration, n_layers=2, prompts=6, d=d_model, planted=1, seed=iteration)
    candidate = candidates(obs)[1]
    policy = SteeringSet.from_functions([SteeringFunction("add", hook(1), {"vector": candidate})], iteration=iteration)
    train = [
        {"iteration": iteration, "split": "train", "metric": metric, "layer": 1, "value": 0.123}
        for metric in ("probe_accuracy", "probe_accuracy_null", "fisher_ratio")
    ]
    result = FakeResult(iteration, policy, policy, train)
    if observed:
        result.activations = obs
    return result


def test_the_live_callback_writes_every_layer_and_the_logit_lens(tiny, tmp_path, capsys):
    model, tok = tiny
    (live,) = live_callbacks(tmp_path / "run", model=model, tokenizer=tok)
    assert live.model is model and live.tokenizer is tok
    results = [fake_result(t, model.cfg.d_model) for t in (1, 2)]
    for result in results:
        live.on_iteration(result)
    assert "warning" not in capsys.readouterr().err
    frame = pd.read_csv(tmp_path / "run" / "analysis_metrics.csv")
    observed = frame[frame["metric"].isin(OBSERVED_METRICS)]
    assert set(observed["layer"]) == {0, 1} and set(observed["iteration"]) == {1, 2}
    assert set(frame[frame["iteration"] == 2]["metric"]) >= set(OBSERVED_METRICS)
    steered = frame[frame["metric"] == "candidate_cos_steered"]
    assert set(steered["layer"]) == {1} and steered["value"].to_numpy() == pytest.approx([1.0, 1.0], abs=1e-5)
    accuracy = frame[(frame["metric"] == "probe_accuracy") & (frame["layer"] == 1)]["value"]
    assert len(accuracy) == 2 and 0.123 not in set(accuracy)  # measured on the observed data, not copied
    lens = pd.read_csv(tmp_path / "run" / "logit_lens.csv", keep_default_na=False)
    assert list(lens.columns) == LENS_COLUMNS and len(lens) == 2 * 2 * 2 * 5  # iterations x layers x signs x k
    assert set(lens["direction"]) == {"candidate"} and set(lens["sign"]) == {"promoted", "suppressed"}
    live.on_iteration(results[1])  # the same iteration again replaces its rows
    assert len(read_lens(tmp_path / "run")) == 40
    figures = tmp_path / "run" / "figures"
    for name in [*FIGURES, "logit_lens"]:
        assert (figures / f"{name}.html").is_file()
    index = (figures / "index.html").read_text()
    assert 'class="lens"' in index and "layer 1</th>" in index and "summary-separability" in index


def test_the_live_callback_reads_earlier_candidates_back_on_resume(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    first, second = fake_result(1, model.cfg.d_model), fake_result(2, model.cfg.d_model)
    earlier = observed_of(first)
    monkeypatch.setattr("analysis.live.load_observed", lambda path, t: earlier if t == 1 else None)
    live = LiveAnalysis(tmp_path / "run", figures=False)  # a resumed run: iteration 1 was never seen here
    live.on_iteration(second)
    frame = pd.read_csv(tmp_path / "run" / "analysis_metrics.csv")
    prev = frame[(frame["metric"] == "candidate_cos_prev") & (frame["layer"] == 1)]["value"].item()
    c1, c2 = summarize(earlier).candidates[1], candidates(observed_of(second))[1]
    assert prev == pytest.approx(float(torch.nn.functional.cosine_similarity(c1, c2, dim=0)), abs=1e-5)
    assert not (tmp_path / "run" / "logit_lens.csv").exists()  # no model, no lens


def test_older_results_without_observed_data_keep_working(tiny, tmp_path, capsys):
    model, tok = tiny
    live = LiveAnalysis(tmp_path / "run", model=model, tokenizer=tok)
    live.on_iteration(fake_result(1, model.cfg.d_model, observed=False))
    assert "warning" not in capsys.readouterr().err
    frame = pd.read_csv(tmp_path / "run" / "analysis_metrics.csv")
    copied = frame[frame["metric"] == "probe_accuracy"]
    assert list(copied["layer"]) == [1] and list(copied["value"]) == [0.123]  # the loop's train rows
    assert not set(frame["metric"]) & {"candidate_norm", "candidate_cos_first"}
    assert not (tmp_path / "run" / "logit_lens.csv").exists()
    index = (tmp_path / "run" / "figures" / "index.html").read_text()
    assert "No logit-lens readings" in index


def test_a_steered_layer_that_is_not_observed_keeps_the_loops_separability(tmp_path):
    result = fake_result(1, 16)  # steers layer 1; here only layer 0 is observed
    obs = result.activations
    result.activations = Observed(
        1, obs.observed_hooks[:1], obs.observed_positives[:, :1], obs.observed_negatives[:, :1], obs.prompt_ids
    )
    LiveAnalysis(tmp_path / "run", figures=False).on_iteration(result)
    frame = pd.read_csv(tmp_path / "run" / "analysis_metrics.csv")
    accuracy = frame[frame["metric"] == "probe_accuracy"].set_index("layer")["value"]
    assert sorted(accuracy.index) == [0, 1] and accuracy[1] == 0.123 and accuracy[0] != 0.123
    assert set(frame[frame["metric"] == "candidate_norm"]["layer"]) == {0}


def test_write_run_lens_fills_in_missing_iterations(tiny, tmp_path):
    model, tok = tiny
    summaries = {t: summarize(observed_of(fake_result(t, model.cfg.d_model))) for t in (1, 2)}
    table = write_run_lens(tmp_path, model, tok, k=2, summaries={1: summaries[1]})
    assert set(table["iteration"]) == {1} and len(table) == 2 * 2 * 2
    table = write_run_lens(tmp_path, model, tok, k=3, summaries=summaries)  # iteration 1 is kept as it was
    assert len(table[table["iteration"] == 1]) == 8 and len(table[table["iteration"] == 2]) == 2 * 2 * 3
