"""``random:CONFIG``: random-weight models of the paper's shapes, without downloading their weights.

For speed and memory checks at the paper's scale; :func:`sims_lens.models.load_model` sends
``random:`` names here (:func:`random_source`, :func:`load_random`).

``random:CONFIG`` builds the model on the meta device, materialises it directly on the target
device in the target dtype (an 8B model in float32 would be 32 GB on the CPU, so nothing is built
there first) and fills it from seeded generators on that device: every matrix normal with standard
deviation ``initializer_range``, each from its own stream (:data:`RANDOM_SEED` and its name), norm
weights 1, biases 0. The same shape, device and dtype give the same weights; the CPU and CUDA
streams differ. The tokenizer is the embedded SmolLM2's, read from the embedded model's cache
folder or from the folder ``$SIMS_LENS_TOKENIZER`` names (its tokenizer files; where there is no
GGUF, as on a GPU machine, ``scripts/device_check.sh`` carries them). So the vocabulary is that
tokenizer's 49,152 tokens, and the Llama shapes' embedding and output head are smaller than the
real models' (128,256 tokens). CONFIG is a path to a ``config.json`` file or one of
:data:`RANDOM_SHAPES`:

| CONFIG | hidden, layers, heads (KV), intermediate | embeddings | rope theta | parameters | the real model's |
| --- | --- | --- | --- | --- | --- |
| ``tiny`` | 64, 2, 4 (2), 128 | tied | 10000 | 3,219,776 | (tests only) |
| ``smollm2-135m`` | 576, 30, 9 (3), 1536: its own config.json | tied | 100000 | 134,515,008 | the same |
| ``llama-3.2-1b`` | 2048, 16, 32 (8), 8192 | tied | 500000, llama3 scaling | 1,073,809,408 | 1,235,814,400 |
| ``llama-3-8b`` | 4096, 32, 32 (8), 14336 | untied | 500000 | 7,382,241,280 | 8,030,261,248 |
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sims_lens.model_files import ModelLoadError, ModelSource, cached_folder_for, embedded_gguf_path, one_line

RANDOM_PREFIX = "random:"
"""A model name starting with this is a random-weight model: ``random:SHAPE`` or ``random:path/config.json``."""
RANDOM_SEED = 0
"""The seed every random-weight model is drawn with."""
TOKENIZER_ENV = "SIMS_LENS_TOKENIZER"
"""Names a folder with the embedded model's tokenizer files, for ``random:`` models where there is no GGUF."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
"""The files a tokenizer folder holds (those of them that the embedded model's cache folder has)."""


@dataclass(frozen=True)
class RandomShape:
    """A built-in ``random:`` shape: Hugging Face config keys, or None for the embedded model's own config.json.

    ``parameters`` counts them with the embedded tokenizer's 49,152-token vocabulary.
    """

    config: dict[str, Any] | None
    parameters: int


_LLAMA3 = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "initializer_range": 0.02, "model_type": "llama"}
RANDOM_SHAPES: dict[str, RandomShape] = {
    "tiny": RandomShape(
        {
            **_LLAMA3,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        3_219_776,
    ),
    "smollm2-135m": RandomShape(None, 134_515_008),
    "llama-3.2-1b": RandomShape(
        {
            **_LLAMA3,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
        1_073_809_408,
    ),
    "llama-3-8b": RandomShape(
        {
            **_LLAMA3,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        },
        7_382_241_280,
    ),
}
"""The built-in ``random:`` shapes (the module docstring's table)."""


def random_source(name: str) -> ModelSource:
    """``random:SHAPE`` (one of :data:`RANDOM_SHAPES`) or ``random:path/to/config.json``."""
    config = name[len(RANDOM_PREFIX) :]
    if config in RANDOM_SHAPES:
        return ModelSource("random", name)
    path = Path(config).expanduser()
    if config and path.is_file():
        return ModelSource("random", f"{RANDOM_PREFIX}{path.resolve()}", path)
    known = ", ".join(f"{RANDOM_PREFIX}{shape}" for shape in RANDOM_SHAPES)
    what = "a folder" if config and path.is_dir() else "no file" if config else "nothing"
    raise ModelLoadError(
        f"model {name!r} names {what} after {RANDOM_PREFIX!r}; use one of the known shapes ({known}) "
        f"or {RANDOM_PREFIX}PATH to a Hugging Face config.json file"
    )


def embedded_files_folder() -> Path:
    """Where the embedded model's tokenizer files (and config.json) are: ``$SIMS_LENS_TOKENIZER`` or its cache.

    The cache folder is made on first use (the GGUF is dequantised once, as for the embedded model).
    """
    env = os.environ.get(TOKENIZER_ENV)
    if not env:
        return cached_folder_for(embedded_gguf_path())
    folder = Path(env).expanduser()
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(
            f"{TOKENIZER_ENV}={env} is not a folder with tokenizer files (no tokenizer.json); copy the "
            f"embedded model's {', '.join(TOKENIZER_FILES)} there, or unset it to read the embedded model's cache"
        )
    return folder


def random_config(source: ModelSource, tokenizer: Any) -> Any:
    """The Hugging Face config of a ``random:`` source, with the tokenizer's vocabulary and special tokens."""
    from transformers import AutoConfig

    shape = RANDOM_SHAPES.get(source.name[len(RANDOM_PREFIX) :])
    if shape is not None and shape.config is not None:
        keys = dict(shape.config)
    else:
        path = source.path if shape is None else embedded_files_folder() / "config.json"
        assert path is not None
        try:
            keys = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"could not read the model configuration {path}: {one_line(err)}") from err
        if not isinstance(keys, dict) or not isinstance(keys.get("model_type"), str):
            raise ModelLoadError(f"{path} is not a Hugging Face config.json (no model_type)")
        for key in ("_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype"):
            keys.pop(key, None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    keys.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
    )
    try:
        return AutoConfig.for_model(**keys)
    except (ValueError, TypeError, KeyError) as err:
        raise ModelLoadError(f"model {source.name!r}: not a configuration transformers can build: {err}") from err


def random_model(config: Any, dtype: torch.dtype, device: str, seed: int = RANDOM_SEED) -> Any:
    """A Hugging Face causal LM of ``config`` with seeded random weights, made directly on ``device`` in ``dtype``.

    Built on the meta device, then materialised on ``device`` (no copy on the CPU first). Each
    parameter is drawn from its own generator on ``device``, seeded by ``seed`` and its name: matrices
    normal with standard deviation ``config.initializer_range``, norm weights 1, other vectors 0.
    Buffers (the rotary frequencies) are computed by the architecture's own initialisation.
    """
    from transformers import AutoModelForCausalLM

    from sims_lens.seeds import derive_seed

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _initialise_buffers(model)
    std = float(getattr(config, "initializer_range", 0.02))
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner = model.get_submodule(name.rpartition(".")[0])
            if param.dim() > 1:
                generator = torch.Generator(device=param.device).manual_seed(derive_seed(seed, "random-model", name))
                param.normal_(0.0, std, generator=generator)
            elif name.endswith("weight") and "norm" in type(owner).__name__.lower():
                param.fill_(1.0)
            else:
                param.zero_()
    model.config.architectures = [type(model).__name__]
    return model.eval()


def _initialise_buffers(model: Any) -> None:
    """Compute every floating buffer of a model materialised uninitialised, with its own initialisation.

    Buffers are first set to NaN, so one that the architecture's ``_init_weights`` does not compute
    is found and refused rather than left holding whatever the memory held.
    """
    owners = [module for module in model.modules() if any(True for _ in module.buffers(recurse=False))]
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if not buffer.is_floating_point():
                raise ModelLoadError(
                    f"random weights for {type(model).__name__}: its integer buffer {name} cannot be initialised here"
                )
            buffer.fill_(float("nan"))
        for module in owners:
            model._init_weights(module)
        unset = [name for name, buffer in model.named_buffers() if bool(buffer.isnan().any())]
    if unset:
        raise ModelLoadError(f"random weights for {type(model).__name__}: no initialisation for buffers {unset}")


def load_random(source: ModelSource, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    """A ``random:`` source's model (random weights on ``device``) and the embedded model's tokenizer."""
    from transformers import AutoTokenizer

    folder = embedded_files_folder()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # OSError, but also tokenizers' own errors on a damaged file
        raise ModelLoadError(f"could not load the tokenizer in {folder}: {one_line(err)}") from err
    return random_model(random_config(source, tokenizer), dtype, device), tokenizer
