"""The built-in prompt set and the prompt loaders (files, Hugging Face datasets, errors)."""

from __future__ import annotations

import json
import random
import sys
import types

import pytest

from sims_lens.prompts import Prompt, builtin_path, load_prompts, sample_batch

# --- the built-in set --------------------------------------------------------------------------


def test_builtin_set_size_split_and_ids():
    everything = load_prompts()
    train = load_prompts(split="train")
    heldout = load_prompts("builtin", split="heldout")
    assert len(everything) == 300
    assert (len(train), len(heldout)) == (240, 60)
    ids = [p.id for p in everything]
    assert len(set(ids)) == len(ids)
    assert {p.id for p in train} | {p.id for p in heldout} == set(ids)
    assert not {p.id for p in train} & {p.id for p in heldout}
    # held-out prompt texts never appear in train (not even case- or space-insensitively)
    norm = lambda p: " ".join(p.text.lower().split())  # noqa: E731
    assert not {norm(p) for p in train} & {norm(p) for p in heldout}
    assert len({norm(p) for p in everything}) == 300


def test_builtin_split_is_fixed():
    heldout = [p.id for p in load_prompts(split="heldout")]
    assert heldout[:3] == ["p0005", "p0010", "p0015"]
    assert load_prompts()[0] == Prompt("p0001", "How can I make new friends after moving to a new city?")


def test_builtin_prompts_are_short_natural_sentences():
    for p in load_prompts():
        assert p.text == p.text.strip()
        assert 10 <= len(p.text) <= 120, p
        assert p.text[0].isupper() and p.text[-1] in ".?!", p
    rows = [json.loads(line) for line in builtin_path().read_text().splitlines()]
    assert all(set(r) == {"id", "prompt", "split"} for r in rows)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match=r"unknown split 'test'.*'train', 'heldout'"):
        load_prompts(split="test")


# --- files ---------------------------------------------------------------------------------------


def test_jsonl_with_and_without_ids_and_custom_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": " Hello there. "}\n\n{"prompt": "Second one?", "id": "x7"}\n')
    assert load_prompts(str(path)) == [Prompt("p0001", "Hello there."), Prompt("x7", "Second one?")]
    other = tmp_path / "q.jsonl"
    other.write_text('{"instruction": "Do a thing.", "prompt": "ignored"}\n')
    assert load_prompts(str(other), column="instruction") == [Prompt("p0001", "Do a thing.")]


def test_jsonl_split_column_selects_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a?", "split": "train"}\n{"prompt": "b?", "split": "heldout"}\n')
    assert [p.text for p in load_prompts(str(path), split="heldout")] == ["b?"]
    assert [p.text for p in load_prompts(str(path))] == ["a?", "b?"]


def test_csv_default_and_custom_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,prompt,question\na1,"Hello, world.",Q one?\na2,Bye now.,Q two?\n')
    assert load_prompts(str(path)) == [Prompt("a1", "Hello, world."), Prompt("a2", "Bye now.")]
    assert [p.text for p in load_prompts(str(path), column="question")] == ["Q one?", "Q two?"]


def test_txt_one_prompt_per_non_empty_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("First prompt?\n\n   \n  Second prompt.  \n")
    assert load_prompts(path) == [Prompt("p0001", "First prompt?"), Prompt("p0002", "Second prompt.")]  # a Path works


# --- errors ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass an existing"):
        load_prompts(str(tmp_path / "nope.jsonl"))


def test_unknown_extension(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"extension '\.parquet'.*\.jsonl, \.csv or a \.txt"):
        load_prompts(str(path))


def test_missing_column_names_the_columns_present(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("question,answer\nWhy?,Because.\n")
    with pytest.raises(ValueError, match=r"no 'prompt' column; columns present: \['answer', 'question'\]"):
        load_prompts(str(path))
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"text": "hi"}\n')
    with pytest.raises(ValueError, match=r"no 'instruction' column.*columns present: \['text'\]"):
        load_prompts(str(jl), column="instruction")


@pytest.mark.parametrize(
    "name, content", [("e.jsonl", "\n\n"), ("e.txt", "  \n"), ("e.csv", "prompt\n"), ("z.csv", "")]
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=r"holds no prompts"):
        load_prompts(str(path))


def test_malformed_json_line_gives_line_number(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": "broken"\n')
    with pytest.raises(ValueError, match=r"line 3: not valid JSON"):
        load_prompts(str(path))
    path.write_text('{"prompt": "ok"}\n["a list"]\n')
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object"):
        load_prompts(str(path))


def test_bad_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"row 2: the 'prompt' value must be non-empty text"):
        load_prompts(str(path))
    path.write_text('{"prompt": "a", "id": "same"}\n{"prompt": "b", "id": "same"}\n')
    with pytest.raises(ValueError, match=r"row 2: duplicate id 'same'"):
        load_prompts(str(path))
    path.write_text('{"prompt": "a", "split": "dev"}\n')
    with pytest.raises(ValueError, match=r"row 1: unknown split 'dev'"):
        load_prompts(str(path))


def test_split_needs_a_split_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"no 'split' column.*use split=None"):
        load_prompts(str(path), split="train")
    txt = tmp_path / "p.txt"
    txt.write_text("a\n")
    with pytest.raises(ValueError, match=r"\.txt file, which has no splits"):
        load_prompts(str(txt), split="heldout")


# --- Hugging Face datasets -----------------------------------------------------------------------


def test_hf_source_reads_the_column(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"instruction": "Tell me a joke.", "x": 1}, {"instruction": "Plan my day.", "x": 2}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    prompts = load_prompts("hf:org/data:test[:2]", column="instruction")
    assert calls == [("org/data", "test[:2]")]
    assert [p.text for p in prompts] == ["Tell me a joke.", "Plan my day."]
    load_prompts("hf:org/data", column="instruction")
    assert calls[-1] == ("org/data", "train")
    with pytest.raises(ValueError, match=r"no 'prompt' column.*\['instruction', 'x'\]"):
        load_prompts("hf:org/data")


def test_hf_source_offline_fails_with_advice(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"could not load the Hugging Face dataset 'org/absent'.*pass a local"):
        load_prompts("hf:org/absent")
    with pytest.raises(ValueError, match=r"needs a dataset name"):
        load_prompts("hf:")


# --- sampling ------------------------------------------------------------------------------------


def test_sample_batch():
    prompts = load_prompts(split="train")
    a = sample_batch(prompts, 16, random.Random(3))
    b = sample_batch(prompts, 16, random.Random(3))
    c = sample_batch(prompts, 16, random.Random(4))
    assert a == b and a != c
    assert len({p.id for p in a}) == 16 and set(a) <= set(prompts)
    assert sorted(p.id for p in sample_batch(prompts[:5], 10, random.Random(0))) == [p.id for p in prompts[:5]]
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        sample_batch(prompts, 0, random.Random(0))
    with pytest.raises(ValueError, match="empty prompt list"):
        sample_batch([], 1, random.Random(0))
