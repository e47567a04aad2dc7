"""Every layer observed at every iteration: the ``observe`` key, the one-pass capture of per-sample
means, the loop's observed fields, and ``observed/iter_NNN.safetensors`` in the run folder."""

from __future__ import annotations

import contextlib
import json
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sims_lens.activations import PairActivations
from sims_lens.capture import capture_tokens, reduce_tokens
from sims_lens.chat import end_token_ids
from sims_lens.config import (
    ConfigError,
    SimsConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    resolve_observe,
    to_toml,
)
from sims_lens.loop import sims_from_config
from sims_lens.run_folder import RunFolder, RunFolderError, open_run
from tests.helpers import Interrupt, LetterOracle, StopAfter, tiny_sims

EVERY = [f"blocks.{layer}.hook_resid_post" for layer in range(4)]


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "all"),
        (['observe="all"'], "all"),
        (['observe="none"'], "none"),
        (["observe=none"], "none"),  # --set reads a bare word as text
        (["observe=[15, 3, 3]"], [3, 15]),
        (['observe="3,15"'], [3, 15]),
        (["observe=3,15"], [3, 15]),
        (["observe=[]"], "none"),
    ],
)
def test_observe_is_all_none_or_layers_like_the_layers_key(overrides, expected):
    assert load_config(None, overrides).observe == expected


@pytest.mark.parametrize(
    "override", ["observe=[true]", 'observe="some"', "observe=[-1]", "observe=3", 'observe="top:2"', "observe=[1.5]"]
)
def test_bad_observe_values_are_config_errors(override):
    with pytest.raises(ConfigError, match=r"observe = .* is not allowed; use 'all' \(every layer\), 'none'"):
        load_config(None, [override])


def test_observe_round_trips_through_toml():
    for overrides in (["observe=[2, 0]"], ['observe="none"'], []):
        config = load_config(None, overrides)
        assert config_from_dict(tomllib.loads(to_toml(config_to_dict(config)))) == config


def test_resolve_observe_gives_the_models_layers_and_names_its_layer_count():
    assert resolve_observe("all", 4) == [0, 1, 2, 3]
    assert resolve_observe("none", 4) == []
    assert resolve_observe([1, 3], 4) == [1, 3]
    assert resolve_observe("3,1", 4) == [1, 3]
    with pytest.raises(ConfigError, match=r"observe: \[4, 7\] out of range; the model has 4 layers \(0-3\)"):
        resolve_observe([0, 4, 7], 4)


def test_an_observed_layer_the_model_lacks_fails_before_any_work(tiny):
    model, tok = tiny
    config = tiny_sims(tiny).config
    with pytest.raises(ConfigError, match=r"observe: \[5\] out of range; the model has 2 layers"):
        tiny_sims(tiny, observe=[1, 5])
    with pytest.raises(ConfigError, match=r"observe: \[5\] out of range; the model has 2 layers"):
        sims_from_config(
            replace(config, observe=[1, 5], prompts="builtin", heldout_prompts="builtin"),
            model=model,
            tokenizer=tok,
            oracle=LetterOracle(),
        )


def test_the_observed_hooks_are_the_observe_layers_at_the_configured_hook(tiny):
    assert tiny_sims(tiny).observed_hooks == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert tiny_sims(tiny, observe=[1]).observed_hooks == ["blocks.1.hook_resid_post"]
    assert tiny_sims(tiny, observe=[1], hook="hook_mlp_out").observed_hooks == ["blocks.1.hook_mlp_out"]
    assert tiny_sims(tiny, observe="none").observed_hooks == []


# ---------------------------------------------------------------- the loop and the run folder


def _run(model_tok, out: Path, stop_after: int | None = None, **settings) -> tuple[RunFolder, list]:
    """A tiny run into ``out`` (resumed if it exists), with the run folder writer; stops after ``stop_after``."""
    resume = RunFolder(out).has_config()
    sims = tiny_sims(model_tok, out=out, resume=resume, **settings)
    sims.callbacks += [StopAfter(stop_after + 1)] if stop_after else []
    folder = RunFolder(out)
    results: list = []
    with contextlib.suppress(Interrupt):
        for result in sims.iterate():
            results.append(result)
    return folder, results


def _pair_prompts(folder: RunFolder, iteration: int) -> list[str]:
    return [p["prompt_id"] for p in folder.read_pairs() if p["update"] == iteration]


def test_a_run_writes_every_observed_layer_of_every_iteration(tiny4, tmp_path: Path):
    folder, results = _run(tiny4, tmp_path / "run", layers=[1])  # 2 iterations, steering layer 1 only
    assert [r.iteration for r in results] == [1, 2]
    assert folder.observed_iterations() == [1, 2]
    assert sorted(p.name for p in folder.observed_dir.iterdir()) == ["iter_001.safetensors", "iter_002.safetensors"]
    for result in results:
        t, n_pairs = result.iteration, len(result.selection.pairs)
        loaded = folder.load_observed(t)
        assert isinstance(loaded, PairActivations) and loaded.iteration == t
        assert loaded.observed_hooks == result.activations.observed_hooks == EVERY
        assert loaded.observed_layers == result.activations.observed_layers == [0, 1, 2, 3]
        assert loaded.prompt_ids == result.activations.prompt_ids == _pair_prompts(folder, t)
        assert result.activations.prompt_ids == [p.positive.prompt_id for p in result.selection.pairs]
        assert loaded.observed_positives.shape == loaded.observed_negatives.shape == (n_pairs, 4, 64)
        assert loaded.observed_positives.dtype == loaded.observed_negatives.dtype == torch.float32
        assert torch.equal(loaded.observed_positives, result.activations.observed_positives)
        assert torch.equal(loaded.observed_negatives, result.activations.observed_negatives)
        # the steered layer is one of the observed ones, with the very means the metrics used
        assert result.hooks == ["blocks.1.hook_resid_post"]
        assert torch.equal(result.activations.observed_positives[:, 1], result.activations.reduced()[0][:, 0])
        assert torch.equal(result.activations.observed_negatives[:, 1], result.activations.reduced()[1][:, 0])
        assert not torch.equal(result.activations.observed_positives[:, 0], result.activations.observed_positives[:, 1])
        with safe_open(str(folder.observed_path(t)), framework="pt") as handle:
            assert sorted(handle.keys()) == ["negatives", "positives"]
            meta = json.loads(handle.metadata()["sims_lens"])
        assert (meta["iteration"], meta["hooks"], meta["layers"]) == (t, EVERY, [0, 1, 2, 3])


def test_observing_a_list_of_layers_records_their_token_means(tiny4):
    model, tok = tiny4
    sims = tiny_sims(tiny4, layers=[2], observe=[0, 2], iterations=1)
    [result] = list(sims.iterate())
    assert result.activations.observed_hooks == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    assert result.activations.observed_positives.shape == (len(result.selection.pairs), 2, 64)
    assert torch.equal(
        result.activations.observed_positives[:, 1], result.activations.reduced()[0][:, 0]
    )  # the steered layer, captured once
    for side, observed in (
        ("positive", result.activations.observed_positives),
        ("negative", result.activations.observed_negatives),
    ):
        exchanges = [getattr(pair, side).exchange for pair in result.selection.pairs]
        tokens = capture_tokens(
            model, exchanges, ["blocks.0.hook_resid_post"], tok.pad_token_id, 8, end_ids=end_token_ids(tok)
        )
        torch.testing.assert_close(observed[:, 0], reduce_tokens(tokens, "mean")[:, 0], atol=1e-5, rtol=1e-5)
    # Sims.capture still gives the steered tokens alone, as before
    alone = sims.capture(1, result.selection, result.hooks)
    assert alone.observed_hooks == []
    for mine, theirs in zip(alone.reduced(), result.activations.reduced(), strict=True):
        assert torch.equal(mine, theirs)


def test_top_k_runs_observe_every_layer_alongside_the_chosen_one(tiny4):
    sims = tiny_sims(tiny4, layers="top:1", iterations=1, prompts_per_iteration=6)
    [result] = list(sims.iterate())
    [layer] = sims.state.layers
    assert result.hooks == [f"blocks.{layer}.hook_resid_post"] and result.activations.observed_hooks == EVERY
    assert result.activations.observed_positives.shape == (len(result.selection.pairs), 4, 64)
    torch.testing.assert_close(
        result.activations.observed_positives[:, layer], result.activations.reduced()[0][:, 0], atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(
        result.activations.observed_negatives[:, layer], result.activations.reduced()[1][:, 0], atol=1e-6, rtol=1e-6
    )


def test_observe_none_gives_empty_observed_tensors_and_no_file(tiny, tmp_path: Path):
    folder, [result] = _run(tiny, tmp_path / "run", observe="none", iterations=1)
    n_pairs = len(result.selection.pairs)
    assert result.activations.observed_hooks == [] and result.activations.observed_layers == []
    assert (
        result.activations.observed_positives.shape == result.activations.observed_negatives.shape == (n_pairs, 0, 64)
    )
    assert result.activations.prompt_ids == [p.positive.prompt_id for p in result.selection.pairs]
    assert folder.completed_iterations == 1
    assert not folder.observed_dir.exists() and folder.observed_iterations() == [] and folder.load_observed(1) is None


def test_a_resumed_run_keeps_the_observed_files_of_finished_iterations(tiny4, tmp_path: Path):
    out = tmp_path / "run"
    folder, results = _run(tiny4, out, stop_after=1, layers=[1])
    assert [r.iteration for r in results] == [1] and folder.observed_iterations() == [1]
    first = folder.observed_path(1).read_bytes()
    folder, results = _run(tiny4, out, layers=[1])
    assert [r.iteration for r in results] == [2]
    assert folder.observed_iterations() == [1, 2] and folder.observed_path(1).read_bytes() == first
    for t in (1, 2):
        loaded = folder.load_observed(t)
        assert loaded is not None and loaded.prompt_ids == _pair_prompts(folder, t)
        assert loaded.observed_positives.shape == (len(loaded.prompt_ids), 4, 64)


# ---------------------------------------------------------------- the observed files


def _activations(n_pairs: int = 3, n_hooks: int = 2, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_pairs, n_hooks, d, generator=g), torch.randn(n_pairs, n_hooks, d, generator=g)


def _observed(iteration: int, hooks, pos, neg, prompt_ids) -> PairActivations:
    return PairActivations(
        iteration, list(prompt_ids), observed_hooks=list(hooks), observed_positives=pos, observed_negatives=neg
    )


def test_observed_files_round_trip_and_respect_completed_iterations(tmp_path: Path):
    folder, _, _ = open_run(tmp_path / "run", SimsConfig(), resume=False)
    hooks, groups = ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"], ["p1", "p2", "p1"]
    pos, neg = _activations()
    path = folder.save_observed(_observed(1, hooks, pos, neg, groups))
    assert path == folder.observed_path(1) == tmp_path / "run" / "observed" / "iter_001.safetensors"
    assert folder.load_observed(1) is None and folder.observed_iterations() == []  # not finished yet
    folder.finish_iteration(1, [15])
    loaded = folder.load_observed(1)
    assert loaded is not None
    assert (loaded.iteration, loaded.observed_hooks, loaded.observed_layers, loaded.prompt_ids) == (
        1,
        hooks,
        [0, 3],
        groups,
    )
    assert torch.equal(loaded.observed_positives, pos) and torch.equal(loaded.observed_negatives, neg)
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["sims_lens"])
    assert meta == {
        "format": "sims-lens-observed",
        "format_version": 1,
        "iteration": 1,
        "hooks": hooks,
        "layers": [0, 3],
        "prompt_ids": groups,
    }
    first = path.read_bytes()
    folder.save_observed(_observed(1, hooks, pos.clone(), neg.clone(), groups))
    assert path.read_bytes() == first  # deterministic, so a resumed run writes the same bytes
    assert not list(folder.observed_dir.glob(".*"))  # no temporary file left behind

    # an iteration that crashed before finishing: ignored by readers, dropped when the run is reopened
    folder.save_observed(_observed(2, hooks, pos, neg, groups))
    assert folder.observed_iterations() == [1] and folder.load_observed(2) is None
    reopened, _, done = open_run(folder.path, None, resume=True)
    assert done == 1 and not folder.observed_path(2).exists() and reopened.observed_iterations() == [1]
    again = reopened.load_observed(1)
    assert again is not None and torch.equal(again.observed_positives, pos)
    assert reopened.load_observed(7) is None


def test_save_observed_refuses_what_does_not_fit_and_load_refuses_a_foreign_file(tmp_path: Path):
    folder = RunFolder(tmp_path)
    pos, neg = _activations()
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    with pytest.raises(ValueError, match="no observed hooks"):
        folder.save_observed(PairActivations(1, ["a", "b", "c"]))
    with pytest.raises(ValueError, match="2 observed layers of activations but 1 hook names"):
        folder.save_observed(_observed(1, hooks[:1], pos, neg, ["a", "b", "c"]))
    with pytest.raises(ValueError, match="2 prompt ids for 3 pairs"):
        folder.save_observed(_observed(1, hooks, pos, neg, ["a", "b"]))
    with pytest.raises(ValueError, match="alike"):
        folder.save_observed(_observed(1, hooks, pos, neg[:2], ["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"blocks\.L"):
        folder.save_observed(_observed(1, ["hook_embed", hooks[1]], pos, neg, ["a", "b", "c"]))
    assert not folder.observed_dir.exists()
    folder.observed_dir.mkdir()
    folder.observed_path(1).write_bytes(b"not a safetensors file")
    with pytest.raises(RunFolderError, match="not a readable observed-activations file"):
        folder.load_observed(1)
