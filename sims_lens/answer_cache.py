"""The unsteered model's answers and their NLL, kept on disk and reused by runs and ``sims-lens eval``.

Every run samples the base model pi_0 on its held-out prompts, and ``sims-lens eval`` samples the
base model (``base``, ``prompting``, ``best_of_k``) once per run folder; runs with the same model,
seed, prompts and sampling settings (a learner comparison, an ablation grid) repeat exactly the same
work. Sampling is reproducible (every row draws from its own seeded stream, ARCHITECTURE.md,
"Sampling"), so the answers can be computed once and read back (ARCHITECTURE.md, "Answer cache").

What is cached is the model's part only: the token ids of the answers (:func:`generate_cached`) and
their mean NLL under the model (:func:`nll_cached`); oracles score them afresh every time. An entry
is found by a key over everything the result depends on: the model's weights (a fingerprint of
every tensor), the device type, dtype and thread count, the torch and transformers versions, the
source of the sampler, the end and pad tokens, the prompt ids, the settings and the seed. Nothing is
cached while hooks are active on the model (a steered policy, a user's hook) or without a seed.

Where: ``$SIMS_LENS_ANSWER_CACHE``, else ``answers/`` under the user cache folder
(:func:`sims_lens.models.cache_dir`); ``SIMS_LENS_ANSWER_CACHE=off`` turns it off. An entry that
cannot be read (a truncated file, another format) is recomputed and rewritten with one warning line.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers

from sims_lens import generation, plain_twin
from sims_lens.chat import Exchange, end_token_ids
from sims_lens.generation import GenerationSettings, generate_ids
from sims_lens.models import cache_dir
from sims_lens.plain_twin import hooked_points

ENV = "SIMS_LENS_ANSWER_CACHE"
FORMAT = 1
"""Bumped when an entry's layout changes (old entries are then never found)."""

_FINGERPRINTS: dict[int, tuple[Any, tuple[tuple[int, int], ...], str]] = {}


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
        return exchanges

    return _through_cache(key, compute, _encode_exchanges, decode)


def nll_cached(
    model: Any,
    exchanges: Sequence[Exchange],
    pad_id: int,
    batch_size: int,
    compute: Callable[[], list[float]],
) -> list[float]:
    """``compute()`` (the responses' mean NLL under the model as it is), read from the cache when it holds it."""
    inputs = {"exchanges": _encode_exchanges(exchanges), "pad": int(pad_id)}
    key = _key(model, "nll", {**inputs, "batch_size": int(batch_size)})

    def decode(entry: Any) -> list[float]:
        values = [float(v) for v in entry]
        if len(values) != len(exchanges):
            raise ValueError(f"it holds {len(values)} values for {len(exchanges)} responses")
        return values

    return _through_cache(key, compute, list, decode)


def model_fingerprint(model: Any) -> str:
    """A digest of every parameter and buffer (name, shape, dtype, sums and a few values).

    One pass of sums over the weights and, for weights that differ anywhere, different with
    overwhelming probability: two checkpoints, a fine-tuned copy, another dtype. Kept per model
    object and computed again once a tensor is edited in place or replaced (torch counts in-place
    edits in each tensor's version).
    """
    module = getattr(model, "original_model", model)
    tensors = [*module.named_parameters(), *module.named_buffers()]
    versions = tuple((t.data_ptr(), t._version) for _, t in tensors)
    cached = _FINGERPRINTS.get(id(model))
    if cached is not None and cached[0] is model and cached[1] == versions:
        return cached[2]
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in tensors:
            flat = tensor.detach().reshape(-1)
            wide = flat.double()
            summary = [float(wide.sum()), float(wide.abs().sum()), float((wide * wide).sum())]
            head = flat[:8].double().tolist()
            digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype), summary, head]).encode())
    fingerprint = digest.hexdigest()
    _FINGERPRINTS[id(model)] = (model, versions, fingerprint)
    return fingerprint


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
    """The entry's name: a digest of what the result depends on; None when the model has hooks active."""
    if hooked_points(model) or answer_cache_dir() is None:
        return None
    device = next(model.parameters()).device
    described = {
        "format": FORMAT,
        "kind": kind,
        "model": model_fingerprint(model),
        "device": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sampler": _sampler_source(),
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _sampler_source() -> str:
    """A digest of the modules whose code decides the answers: a change to the sampler is a new key."""
    return hashlib.sha256("".join(inspect.getsource(m) for m in (generation, plain_twin)).encode()).hexdigest()


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
        _write_atomic(path, json.dumps(encode(result)))
    except OSError as err:
        print(f"warning: could not write the answer cache entry {path}: {err}", file=sys.stderr)
    return result


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
