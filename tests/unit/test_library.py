"""The library face: ``Sims(...)`` with keywords, a function as oracle, ``fit_pairs``, ``init``, ``out``, ``fit``."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
import torch

import sims_lens
from sims_lens import Sims, SimsConfig, fit_pairs
from sims_lens.capture import capture_tokens, reduce_tokens
from sims_lens.chat import Exchange, encode_chat, end_token_ids, response_ids_for_text
from sims_lens.config import load_config
from sims_lens.models import ModelLoadError
from sims_lens.oracles.function import OracleOutputError
from sims_lens.oracles.lexicon import LexiconSentiment
from sims_lens.pairs import load_pairs
from sims_lens.run_folder import RunFolder
from sims_lens.steering.io import load_steering
from sims_lens.validation import ConfigError
from tests.helpers import HELDOUT, TRAIN, LetterOracle, tiny_sims

README = Path(__file__).resolve().parents[2] / "README.md"
PAIRS = [
    ("How was your day?", "It was wonderful, thank you!", "It was awful."),
    ("What do you think of rain?", "Rain is lovely and refreshing.", "Rain is miserable and cold."),
    ("Describe your street.", "A friendly, cheerful place.", "A dull, grim place."),
]


def as_dict(pair: tuple[str, str, str]) -> dict[str, str]:
    return dict(zip(("prompt", "chosen", "rejected"), pair, strict=True))


def readme_example() -> str:
    """The first Python block of README's "Python API" section, as printed."""
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_readme_example_is_short_and_runs_on_a_tiny_model(monkeypatch):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12
    tiny16 = sims_lens.tiny_model(n_layers=16, d_model=32, seed=3)  # layers=[15] as printed
    monkeypatch.setattr(sims_lens, "load_model", lambda *args, **kwargs: tiny16)
    # a random-weight model writes no sentiment words: VADER's registered class scores letters here instead
    monkeypatch.setattr(LexiconSentiment, "score_text", lambda self, text: text.count("e") / max(len(text), 1))
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["1", "2", "3"]
    assert all(float(line.split()[1]) == float(line.split()[1]) for line in lines[:3])  # finite rewards printed
    assert lines[3].startswith("[") and namespace["sims"].state.completed == 3
    assert sims_lens.steering.hooks.active_hook_count(tiny16[0]) == 0  # apply() removed its hooks


def test_a_lambda_is_the_oracle(tiny):
    sims = tiny_sims(tiny, lambda prompts, responses: [[float(len(r)) for r in group] for group in responses])
    assert sims.config.oracle == "python:oracle callable" and not sims_lens.oracles.is_relative(sims.oracle)
    [first, _] = list(sims.iterate())
    assert all(s.reward == float(len(s.response)) for s in first.samples)
    assert first.heldout.reward_mean == pytest.approx(
        sum(len(r) for group in first.heldout.responses for r in group) / len(first.heldout.rewards)
    )


def test_a_function_oracle_of_the_wrong_shape_is_one_clear_error(tiny):
    sims = tiny_sims(tiny, lambda prompts, responses: [[1.0] for _ in responses], iterations=1)
    with pytest.raises(OracleOutputError, match=r"returned 1 scores for prompt 0's 3 responses"):
        list(sims.iterate())
    with pytest.raises(ConfigError, match="oracle = 42 is not allowed"):
        tiny_sims(tiny, 42)


def test_the_configuration_given_is_never_changed(tiny):
    model, tok = tiny
    config = SimsConfig(
        layers=[0, 1], iterations=1, observe="none", prompts_per_iteration=4, max_new_tokens=4, validation_size=2
    )
    before = copy.deepcopy(config)
    sims = Sims(model, tok, config=config, oracle=LetterOracle(), prompts=TRAIN, heldout_prompts=HELDOUT, update="ema")
    assert config == before
    assert sims.config is not config and sims.config.update == "ema" and sims.config.update_rate == 0.5
    assert sims.config.dtype == "float32" and sims.config.positions == "all"  # what "auto" became
    assert sims.config.oracle == "python:oracle letter_e" and sims.config.prompts.startswith("python:8 prompts ")


def test_keyword_settings_are_checked_with_the_toml_messages(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError) as toml:
        load_config(None, ["samples_per_prompt=1"])
    with pytest.raises(ConfigError) as keyword:
        Sims(model, tok, oracle=LetterOracle(), prompts=TRAIN, heldout_prompts=HELDOUT, samples_per_prompt=1)
    assert str(keyword.value) == str(toml.value)
    with pytest.raises(ConfigError, match="unknown configuration key 'iteration'"):
        Sims(model, tok, oracle=LetterOracle(), iteration=3)
    with pytest.raises(ConfigError, match=r"layers: \[5\] out of range; the model has 2 layers"):
        Sims(
            model,
            tok,
            oracle=LetterOracle(),
            prompts=TRAIN,
            heldout_prompts=HELDOUT,
            prompts_per_iteration=4,
            layers=[5],
        )
    with pytest.raises(ConfigError, match="also training prompts"):
        Sims(
            model,
            tok,
            oracle=LetterOracle(),
            prompts=["a b", "c d"],
            heldout_prompts=["c d"],
            prompts_per_iteration=2,
            layers=[0],
        )
    sims = tiny_sims(tiny, contrast={"bank_size": 64}, learners={"probe": {"l2": 0.5}}, learner="probe")
    assert sims.config.contrast.bank_size == 64 and sims.learner.l2 == 0.5  # nested tables given as dicts


def _exchanges(tok, side: int) -> list[Exchange]:
    return [Exchange(tuple(encode_chat(tok, p[0])), tuple(response_ids_for_text(tok, p[side]))) for p in PAIRS]


@pytest.mark.parametrize("reduction", ["mean", "last"])
def test_fit_pairs_is_the_mean_difference_of_the_loops_capture(tiny, reduction):
    model, tok = tiny
    steering = fit_pairs(model, tok, PAIRS, layers=[0, 1], reduction=reduction)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert steering.hooks == hooks and steering.positions == "all"
    ends = end_token_ids(tok)
    pos = reduce_tokens(capture_tokens(model, _exchanges(tok, 1), hooks, tok.pad_token_id, end_ids=ends), reduction)
    neg = reduce_tokens(capture_tokens(model, _exchanges(tok, 2), hooks, tok.pad_token_id, end_ids=ends), reduction)
    for i, hook in enumerate(hooks):
        torch.testing.assert_close(steering.direction(hook), (pos[:, i] - neg[:, i]).mean(0), atol=1e-5, rtol=1e-5)


def test_fit_pairs_reads_files_and_refuses_bad_pairs(tiny, tmp_path):
    model, tok = tiny
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(as_dict(p)) + "\n" for p in PAIRS))
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\n" + "".join(",".join(f'"{x}"' for x in p) + "\n" for p in PAIRS))
    assert load_pairs(jsonl) == load_pairs(csv) == load_pairs([as_dict(p) for p in PAIRS])
    from_file = fit_pairs(model, tok, jsonl, layers=1)
    from_list = fit_pairs(model, tok, PAIRS, layers=1)
    assert torch.equal(from_file.direction("blocks.1.hook_resid_post"), from_list.direction("blocks.1.hook_resid_post"))
    assert fit_pairs(model, tok, PAIRS).hooks == ["blocks.1.hook_resid_post"]  # default: the middle layer
    with pytest.raises(ValueError, match=r"pairs\[1\] lacks the field\(s\) \['rejected'\]"):
        load_pairs([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match="at least 2"):
        load_pairs(PAIRS[:1])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=r"layers: \[7\] out of range"):
        fit_pairs(model, tok, PAIRS, layers=[7])
    with pytest.raises(ConfigError, match="reduction = 'max' is not allowed"):
        fit_pairs(model, tok, PAIRS, reduction="max")


def test_a_run_starts_from_init_and_out_writes_a_resumable_folder(tiny, tmp_path):
    model, tok = tiny
    init = fit_pairs(model, tok, PAIRS, layers=[0, 1])
    out = tmp_path / "run"
    sims = tiny_sims(tiny, init=init, iterations=1, out=out)
    assert sims.policy is init and sims.config.init.startswith("python:steering set ")
    [first] = list(sims.iterate())
    for hook in init.hooks:  # accumulate: pi_1 = init + the first fit
        torch.testing.assert_close(first.policy.direction(hook), init.direction(hook) + first.fitted.direction(hook))
    folder = RunFolder(out)
    assert folder.completed_iterations == 1 and [p.text for p in folder.heldout_prompts()] == [p.text for p in HELDOUT]
    assert not folder.lock_path.exists()  # released after the loop
    with pytest.raises(ValueError, match="already holds a run"):
        tiny_sims(tiny, out=out)
    resumed = tiny_sims(tiny, init=init, iterations=2, out=out, resume=True)
    assert [r.iteration for r in resumed.iterate()] == [2] and folder.completed_iterations == 2
    saved = init.scaled(1.0)
    path = tmp_path / "init.safetensors"
    sims_lens.save_steering(saved, path, model)
    from_file = tiny_sims(tiny, init=str(path), iterations=1)
    assert from_file.config.init == str(path) and from_file.policy is not None


def test_the_fit_command_writes_a_steering_file(tiny, tmp_path, monkeypatch, capsys):
    from sims_lens.cli import main

    model, tok = tiny
    monkeypatch.setattr("sims_lens.models.load_model", lambda *args, **kwargs: (model, tok))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(as_dict(p)) + "\n" for p in PAIRS))
    out = tmp_path / "vec.safetensors"
    assert main(["fit", "--pairs", str(pairs), "--out", str(out), "--layers", "0,1", "--reduction", "last"]) == 0
    loaded = load_steering(out, model)
    expected = fit_pairs(model, tok, PAIRS, layers=[0, 1], reduction="last")
    for hook in expected.hooks:
        torch.testing.assert_close(loaded.direction(hook), expected.direction(hook))
    assert main(["fit", "--pairs", str(pairs), "--out", str(out)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n{"prompt": "c"}\n')
    assert main(["fit", "--pairs", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: pairs file") and "lacks the field(s) ['rejected']" in err[0]


def test_the_names_outside_scripts_import_stay_where_they_are():
    from sims_lens import load_model
    from sims_lens.chat import Exchange, encode_chat, left_pad
    from sims_lens.evaluation import response_nll
    from sims_lens.generation import GenerationSettings, decode_response, generate_ids
    from sims_lens.models import cache_dir
    from sims_lens.steering.hooks import apply_steering
    from sims_lens.steering.io import load_steering as load

    assert all(callable(f) for f in (load_model, encode_chat, left_pad, response_nll, decode_response, generate_ids))
    assert all(callable(f) for f in (cache_dir, apply_steering, load, Exchange, GenerationSettings))
    assert callable(sims_lens.SteeringSet.scaled) and callable(sims_lens.SteeringSet.norms)


def test_run_takes_model_on_the_command_line(tiny, tmp_path, monkeypatch):
    from sims_lens.cli import main

    asked: list[str | None] = []

    def fake_load(name=None, **kwargs):
        asked.append(name)
        return tiny

    monkeypatch.setattr("sims_lens.models.load_model", fake_load)
    monkeypatch.setattr(LexiconSentiment, "score_text", lambda self, text: text.count("e") / max(len(text), 1))
    sets = ["iterations=1", "prompts_per_iteration=4", "max_new_tokens=4", "layers=[0]", 'observe="none"']
    out = tmp_path / "run"
    code = main(
        ["run", "--model", "my/model", "--out", str(out), "--no-progress", *[a for s in sets for a in ("--set", s)]]
    )
    assert code == 0 and asked == ["my/model"]
    assert RunFolder(out).read_config().model == "my/model" and RunFolder(out).completed_iterations == 1


def test_objects_are_recorded_so_the_run_can_be_rebuilt_or_refused_clearly(tiny, tmp_path):
    from sims_lens.steering.learners import HPRLearner, make_learner

    model, tok = tiny
    sims = tiny_sims(tiny, learner=HPRLearner(epochs=3), iterations=1)
    assert sims.config.learner == "hpr" and sims.config.learners["hpr"]["epochs"] == 3
    rebuilt = Sims(model, tok, config=sims.config, oracle=LetterOracle(), prompts=TRAIN, heldout_prompts=HELDOUT)
    assert rebuilt.learner == make_learner("hpr", {"epochs": 3})  # a registered object rebuilds from the record
    assert sims.config.model.startswith("python:model")  # tiny_model is not loaded by a name
    with pytest.raises(ModelLoadError, match="was given to Sims as a Python object"):
        sims_lens.load_model(sims.config.model)
    with pytest.raises(ConfigError, match="was given as a Python object"):
        Sims(model, tok, config=sims.config, prompts=TRAIN, heldout_prompts=HELDOUT)  # the oracle was a function
    with pytest.raises(ConfigError, match="oracle_relative = True is not allowed with the registered oracle"):
        tiny_sims(tiny, "lexicon_sentiment", oracle_relative=True)


def test_prompts_are_stripped_and_iterating_twice_goes_on(tiny, tmp_path):
    out = tmp_path / "run"
    sims = tiny_sims(tiny, iterations=1, out=out, prompts=[f"  {p.text}\n" for p in TRAIN])
    assert all(p.text == p.text.strip() for p in sims.train_prompts)
    assert [r.iteration for r in sims.iterate()] == [1]
    sims.config = dataclasses.replace(sims.config, iterations=2)
    assert [r.iteration for r in sims.iterate()] == [2]  # the folder is this run's: no "already holds a run"
    resumed = tiny_sims(tiny, iterations=3, out=out, resume=True, prompts=[f"  {p.text}\n" for p in TRAIN])
    assert [r.iteration for r in resumed.iterate()] == [3] and RunFolder(out).completed_iterations == 3


def test_a_run_from_an_init_object_resumes_and_keeps_its_own_positions(tiny, tmp_path):
    from sims_lens.steering.learners import HPRLearner

    model, tok = tiny
    init = fit_pairs(model, tok, PAIRS, learner=HPRLearner(epochs=2), layers=[0])  # positions "generated"
    out = tmp_path / "run"
    sims = tiny_sims(tiny, init=init, layers=[0], iterations=1, out=out)
    [first] = list(sims.iterate())
    assert init.positions == "generated" and first.policy.positions == sims.config.positions == "all"
    assert RunFolder(out).init_path.is_file()
    again = tiny_sims(tiny, init=init, layers=[0], iterations=1, out=tmp_path / "other")
    assert again.config.init == sims.config.init  # the same object records the same text
    resumed = tiny_sims(tiny, init=init, layers=[0], iterations=2, out=out, resume=True)
    assert resumed.policy is None or resumed.state.completed == 0  # read from the folder when iterating
    assert [r.iteration for r in resumed.iterate()] == [2]
    wrong = sims_lens.tiny_model(n_layers=2, d_model=32, seed=5)[0]
    other = fit_pairs(wrong, tok, PAIRS, layers=[0])
    with pytest.raises(ValueError, match="d_model=32"):
        tiny_sims(tiny, init=other, layers=[0])
