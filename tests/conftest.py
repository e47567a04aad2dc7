"""Shared fixtures: a tiny random-weight model (unit tests) and the embedded model (integration)."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    """Tests compute every answer, session- and module-scoped fixtures included (a test of the answer
    cache points it at a folder of its own)."""
    os.environ["SIMS_LENS_ANSWER_CACHE"] = "off"


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer random-weight Llama bridge and its tokenizer (built offline in about a second)."""
    from sims_lens.tiny import tiny_model

    return tiny_model(n_layers=2, d_model=64, seed=0)


@pytest.fixture(scope="session")
def tiny4():
    """A 4-layer random-weight Llama bridge (d_model 64, seed 1): layers between and above the captured ones exist."""
    from sims_lens.tiny import tiny_model

    return tiny_model(n_layers=4, d_model=64, seed=1)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct in float32 (dequantised and cached on first use)."""
    from sims_lens.models import load_model

    return load_model(None, dtype="float32")


@pytest.fixture(scope="session")
def hf_model():
    """The embedded model's plain Hugging Face module (float32, eager attention), for steering-vectors."""
    import torch
    from transformers import AutoModelForCausalLM

    from sims_lens.models import cached_folder_for, embedded_gguf_path

    folder = cached_folder_for(embedded_gguf_path())
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
