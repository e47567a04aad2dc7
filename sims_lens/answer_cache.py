"""The unsteered model's answers and their NLL, kept on disk and reused by runs and ``sims-lens eval``.

Every run samples the base model pi_0 on its held-out prompts, and ``sims-lens eval`` samples the
base model (``base``, ``prompting``, ``best_of_k``) once per run folder; runs with the same model,
seed, prompts and sampling settings (a learner comparison, an ablation grid) repeat exactly the same
work. Sampling is reproducible (every row draws from its own seeded stream, ARCHITECTURE.md,
"Sampling"), so the answers can be computed once and read back (ARCHITECTURE.md, "Answer cache").

What is cached is the model's part only: the token ids of the answers (:func:`generate_cached`) and
their mean NLL under the model (:func:`nll_cached`); oracles score them afresh every time. An entry
is found by a key over what the result depends on: the model's weights (a fingerprint of every
tensor, :mod:`sims_lens.fingerprint`) and config, the hardware (device model, instruction set,
threads, matmul precision), the torch, transformers and transformer-lens versions, the source of
the modules that decide answers and NLL (:data:`CODE`), the end and pad tokens, the prompt ids,
the settings and the seed. Nothing is cached while hooks are active on the model (a steered
policy, a user's hook) or without a seed.

Where: ``$SIMS_LENS_ANSWER_CACHE``, else ``answers/`` under the user cache folder
(:func:`sims_lens.models.cache_dir`); ``SIMS_LENS_ANSWER_CACHE=off`` turns it off. An entry that
cannot be read (a truncated file, another format) is recomputed and rewritten with one warning line.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

import torch
import transformers

import sims_lens
from sims_lens.chat import Exchange, end_token_ids
from sims_lens.files import write_atomic
from sims_lens.fingerprint import model_fingerprint
from sims_lens.generation import GenerationSettings, generate_ids
from sims_lens.models import cache_dir
from sims_lens.plain_twin import hooked_points

ENV = "SIMS_LENS_ANSWER_CACHE"
CODE = tuple(
    f"sims_lens.{name}"
    for name in (
        "generation",
        "kv_cache",
        "plain_twin",
        "packed_linear",
        "chat",
        "seeds",
        "steering.positions",
        "capture",
        "evaluation",
    )
)
"""The modules whose source is part of every key: the sampler, its KV cache, twin and packed weights,
chat formatting and token spans, seeds, position tracking, padded batches, and the NLL's forward."""
FORMAT = 1
"""Bumped when an entry's layout changes (old entries are then never found)."""


def answer_cache_dir() -> Path | None:
    """The cache folder, or None when ``$SIMS_LENS_ANSWER_CACHE`` is ``off`` (or ``0``, ``false``, ``no``)."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() in {"off", "0", "false", "no"}:
        return None
    return Path(env).expanduser() if env else cache_dir() / "answers"


def generate_cached(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    seed: int | None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Exchange]:
    """:func:`~sims_lens.generation.generate_ids` of the model as it is, read from the cache when it holds them."""
    key = None if seed is None else _key(model, "generate", _generation_inputs(tokenizer, prompts, settings, seed))

    def compute() -> list[Exchange]:
        return generate_ids(model, tokenizer, prompts, settings, seed=seed, on_batch=on_batch)

    def decode(entry: Any) -> list[Exchange]:
        exchanges = [Exchange(tuple(p), tuple(r)) for p, r in entry]
        if [list(ex.prompt_ids) for ex in exchanges] != [list(p) for p in prompts]:
            raise ValueError("its prompts are not the ones asked for")
        if on_batch is not None:  # read back: the progress is complete at once
            on_batch(len(exchanges))
        return exchanges

    return _through_cache(key, compute, _encode_exchanges, decode)


def nll_cached(
    model: Any,
    exchanges: Sequence[Exchange],
    pad_id: int,
    batch_size: int | str,
    compute: Callable[[], list[float]],
) -> list[float]:
    """``compute()`` (the responses' mean NLL under the model as it is), read from the cache when it holds it."""
    inputs = {"exchanges": _encode_exchanges(exchanges), "pad": int(pad_id)}
    key = _key(model, "nll", {**inputs, "batch_size": batch_size})

    def decode(entry: Any) -> list[float]:
        values = [float(v) for v in entry]
        if len(values) != len(exchanges):
            raise ValueError(f"it holds {len(values)} values for {len(exchanges)} responses")
        return values

    return _through_cache(key, compute, list, decode)


def _generation_inputs(
    tokenizer: Any, prompts: Sequence[Sequence[int]], settings: GenerationSettings, seed: int
) -> dict[str, Any]:
    eos = end_token_ids(tokenizer)
    return {
        "prompts": [[int(t) for t in p] for p in prompts],
        "settings": asdict(settings),
        "seed": int(seed),
        "end_ids": sorted(int(t) for t in eos),
        "pad_id": None if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id),
    }


def _key(model: Any, kind: str, inputs: dict[str, Any]) -> str | None:
    """The entry's name: a digest of what the result depends on; None when the model has hooks active
    (or is not a TransformerLens model, whose hooks cannot be listed)."""
    if answer_cache_dir() is None or not hasattr(model, "hook_dict") or hooked_points(model):
        return None
    described = {
        "format": FORMAT,
        "kind": kind,
        "model": model_fingerprint(model),
        "config": _config_digest(model),
        "hardware": _hardware(next(model.parameters()).device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": _version_of("transformer_lens"),
        "code": _code_digest(),
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


@cache
def _version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _hardware(device: torch.device) -> dict[str, Any]:
    """What the numerics depend on besides the code: the device model, its instruction set, threads, precision."""
    described: dict[str, Any] = {"type": device.type, "matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cpu":
        described |= {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    elif device.type == "cuda":
        described |= {
            "name": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)),
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        }
    return described


def _config_digest(model: Any) -> str:
    config: Any = getattr(getattr(model, "original_model", model), "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    return hashlib.sha256(text.encode()).hexdigest()


@cache
def _code_digest() -> str:
    """A digest of the modules whose code decides the answers and their NLL: changing them is a new key."""
    digest = hashlib.sha256()
    try:  # read as files, not imported: evaluation imports this module
        for name in CODE:
            spec = importlib.util.find_spec(name)
            digest.update(Path(str(spec.origin if spec else "")).read_bytes())
    except OSError:  # no source shipped: the package version stands in
        return f"sims_lens {sims_lens.__version__}"
    return digest.hexdigest()


def _encode_exchanges(exchanges: Sequence[Exchange]) -> list[list[list[int]]]:
    return [[list(ex.prompt_ids), list(ex.response_ids)] for ex in exchanges]


def _through_cache(
    key: str | None, compute: Callable[[], Any], encode: Callable[[Any], Any], decode: Callable[[Any], Any]
) -> Any:
    """``compute()``, or the entry ``key`` decoded; a computed result is stored (no key: no cache)."""
    folder = answer_cache_dir()
    if key is None or folder is None:
        return compute()
    path = folder / key[:2] / f"{key}.json"
    if path.is_file():
        try:
            return decode(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            print(f"warning: answer cache entry {path} is unreadable ({err}); computing it again", file=sys.stderr)
    result = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(encode(result)))
    except OSError as err:
        print(f"warning: could not write the answer cache entry {path}: {err}", file=sys.stderr)
    return result
