"""``random:CONFIG`` models: names, shapes and their parameter counts, seeded weights, the tokenizer folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sims_lens import models, random_models
from sims_lens.model_files import ModelLoadError, ModelSource
from sims_lens.random_models import RANDOM_SHAPES, random_config, random_model, random_source
from sims_lens.tiny import tiny_tokenizer

EMBEDDED_VOCAB = 49152
LLAMA3_VOCAB = 128256


class CountingTokenizer:
    """As much of a tokenizer as :func:`random_config` reads: its size and special tokens."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 1, 2, 2

    def __len__(self) -> int:
        return self.size


def meta_parameters(shape: str, vocab: int) -> int:
    config = random_config(ModelSource("random", f"random:{shape}"), CountingTokenizer(vocab))
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["random:nope", "random:", "random:llama-3-70b"])
def test_unknown_shapes_are_refused_with_the_known_ones(name: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        models.resolve_source(name)
    for shape in RANDOM_SHAPES:
        assert f"random:{shape}" in str(err.value)
    assert "config.json" in str(err.value)


def test_a_folder_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="names a folder"):
        models.resolve_source(f"random:{tmp_path}")


@pytest.mark.parametrize("shape", [s for s, spec in RANDOM_SHAPES.items() if spec.config is not None])
def test_built_in_shapes_have_the_documented_parameter_counts(shape: str) -> None:
    count = meta_parameters(shape, EMBEDDED_VOCAB)
    assert count == RANDOM_SHAPES[shape].parameters
    assert random_models.__doc__ is not None and f"{count:,}" in random_models.__doc__
    if shape != "tiny":  # the table's last column: the real model, with Llama-3's vocabulary
        assert f"{meta_parameters(shape, LLAMA3_VOCAB):,}" in random_models.__doc__


def test_the_llama_shapes_are_the_papers_models() -> None:
    one_b = random_config(ModelSource("random", "random:llama-3.2-1b"), CountingTokenizer(EMBEDDED_VOCAB))
    eight_b = random_config(ModelSource("random", "random:llama-3-8b"), CountingTokenizer(EMBEDDED_VOCAB))
    assert (one_b.hidden_size, one_b.num_hidden_layers, one_b.num_attention_heads) == (2048, 16, 32)
    assert (one_b.num_key_value_heads, one_b.intermediate_size, one_b.tie_word_embeddings) == (8, 8192, True)
    assert (eight_b.hidden_size, eight_b.num_hidden_layers, eight_b.num_attention_heads) == (4096, 32, 32)
    assert (eight_b.num_key_value_heads, eight_b.intermediate_size, eight_b.tie_word_embeddings) == (8, 14336, False)
    assert one_b.rope_parameters["rope_theta"] == eight_b.rope_parameters["rope_theta"] == 500000.0
    assert one_b.vocab_size == eight_b.vocab_size == EMBEDDED_VOCAB


def test_random_weights_are_seeded_and_initialised_as_documented() -> None:
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = random_config(random_source("random:tiny"), tokenizer)
    first = random_model(config, torch.float32, "cpu")
    again = random_model(config, torch.float32, "cpu")
    other = random_model(config, torch.float32, "cpu", seed=1)
    state, state_again, state_other = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert not torch.equal(
        state["model.layers.0.self_attn.q_proj.weight"], state_other["model.layers.0.self_attn.q_proj.weight"]
    )
    assert first.lm_head.weight is first.model.embed_tokens.weight  # tied, as the shape says
    for name, param in first.named_parameters():
        if param.dim() == 1:
            assert torch.equal(param, torch.ones_like(param)), name  # Llama's only vectors are RMSNorm weights
        else:
            assert abs(float(param.detach().std()) - config.initializer_range) < 0.1 * config.initializer_range, name
    reference = LlamaForCausalLM(config)  # built on the CPU the ordinary way: its rotary frequencies
    assert torch.equal(first.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert first.config.vocab_size == len(tokenizer) and first.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(first(ids).logits).all()


def test_a_config_json_file_is_a_shape(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "vocab_size": 7,  # replaced by the tokenizer's
                "_name_or_path": "someone/else",
            }
        )
    )
    source = models.resolve_source(f"random:{path}")
    assert source.origin == "random" and source.path == path
    tokenizer = tiny_tokenizer()
    config = random_config(source, tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 1, len(tokenizer))
    assert random_model(config, torch.float32, "cpu").model.embed_tokens.weight.shape == (len(tokenizer), 32)
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not read the model configuration"):
        random_config(source, tokenizer)
    path.write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(ModelLoadError, match="no model_type"):
        random_config(source, tokenizer)


def test_a_tokenizer_folder_without_files_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(random_models.TOKENIZER_ENV, str(tmp_path))
    with pytest.raises(ModelLoadError, match="SIMS_LENS_TOKENIZER"):
        models.load_model("random:tiny", device="cpu")


@pytest.mark.integration  # the embedded model's tokenizer and config.json
def test_random_models_boot_with_the_embedded_tokenizer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sims_lens import Sims

    monkeypatch.delenv(random_models.TOKENIZER_ENV, raising=False)
    model, tokenizer = models.load_model("random:tiny", device="cpu")
    assert len(tokenizer) == EMBEDDED_VOCAB == model.cfg.d_vocab
    assert model.cfg.n_layers == 2 and model.sims_lens_name == "random:tiny"
    sims = Sims(model, tokenizer, layers=[1], iterations=1, progress=False)
    assert sims.config.model == "random:tiny"  # a run folder names it, so it reloads

    cache = random_models.embedded_files_folder()
    carried = tmp_path / "tokenizer"
    carried.mkdir()
    for name in random_models.TOKENIZER_FILES:
        if (cache / name).is_file():
            shutil.copy2(cache / name, carried / name)
    monkeypatch.setenv(random_models.TOKENIZER_ENV, str(carried))
    again, carried_tokenizer = models.load_model("random:tiny", device="cpu")
    assert carried_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert carried_tokenizer.chat_template == tokenizer.chat_template
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters(), strict=True))
    with pytest.raises(ModelLoadError, match=r"config\.json"):  # the SmolLM2 shape reads it from the same folder
        models.load_model("random:smollm2-135m", device="cpu")


@pytest.mark.integration  # the embedded model's config.json
def test_the_smollm2_shape_is_the_embedded_models_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(random_models.TOKENIZER_ENV, raising=False)
    config = random_config(ModelSource("random", "random:smollm2-135m"), CountingTokenizer(EMBEDDED_VOCAB))
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (576, 30, 3)
    assert meta_parameters("smollm2-135m", EMBEDDED_VOCAB) == RANDOM_SHAPES["smollm2-135m"].parameters
