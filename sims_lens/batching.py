"""Batch sizes from free memory, and batches that halve and retry when memory runs out.

``batch_size = "auto"`` (the default) sizes each batch of sampling, capture and NLL from the work
and the device: the bytes one row needs (its KV cache, one layer's activations, its logits;
:func:`bytes_per_row`) against :data:`MEMORY_SHARE` of the free memory
(:func:`sims_lens.memory.free_bytes`), capped at :data:`CAPS` for the device and at the number of
rows. On the CPU the cap is what runs fastest (BENCHMARKS.md: batch 64 samples 1.75x the tokens
per second of batch 16), not memory. A number is used as given.

Whatever the size, :func:`run_in_batches` catches an out-of-memory error, halves the batch and
runs it again, so a misjudged size costs one retry instead of the run (on CUDA and MPS; on a
Linux host the kernel usually ends a process that runs out of memory before torch can raise).
Every batch's result is independent of the batch it ran in (ARCHITECTURE.md, "Sampling"), so a
retry changes nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from sims_lens.memory import free_bytes
from sims_lens.validation import is_int

BatchSize = int | str
"""A batch size: an integer >= 1, or ``"auto"``."""
AUTO = "auto"
Work = Literal["generate", "capture", "nll"]

MEMORY_SHARE = 0.5
"""The part of the free memory a batch may plan to use (the allocator's slack, the packed weights
and the oracles' models need the rest)."""
CAPS: dict[str, dict[str, int]] = {
    "cuda": {"generate": 1024, "capture": 256, "nll": 256},
    "cpu": {"generate": 64, "capture": 16, "nll": 16},
    "mps": {"generate": 64, "capture": 16, "nll": 16},
}
"""The largest automatic batch per device type and work (beyond it a GPU gains little)."""
NOMINAL = 16
"""What ``"auto"`` stands for where a number is needed before the work is known (progress steps)."""


class BatchMemoryError(RuntimeError):
    """Even a batch of one row does not fit in the device's memory."""


def is_batch_size(value: Any) -> bool:
    """Whether ``value`` is a batch size: an integer >= 1 (not a bool) or ``"auto"``."""
    return value == AUTO or (is_int(value) and value >= 1)


def check_batch_size(value: Any) -> BatchSize:
    """``value`` if it is an integer >= 1 or ``"auto"``, else a ValueError naming both forms."""
    if is_batch_size(value):
        return value
    raise ValueError(f"batch_size must be an integer >= 1 or 'auto', got {value!r}")


def nominal(batch_size: BatchSize) -> int:
    """``batch_size`` as a number (:data:`NOMINAL` for ``"auto"``)."""
    return NOMINAL if batch_size == AUTO else int(batch_size)


def fitted_batch_size(model: Any, batch_size: BatchSize, work: Work, rows: int, tokens: int, kept: int = 1) -> int:
    """The batch size for ``rows`` rows of up to ``tokens`` tokens (``kept``: for NLL the positions whose
    logits are kept, for capture the hooks whose activations are kept).

    A number is returned as given (capped at ``rows``); ``"auto"`` fits :func:`bytes_per_row` into
    :data:`MEMORY_SHARE` of the free memory of the model's device, within :data:`CAPS`.
    """
    rows = max(1, rows)
    check_batch_size(batch_size)
    if batch_size != AUTO:
        return max(1, min(int(batch_size), rows))
    device = next(model.parameters()).device
    cap = CAPS.get(device.type, CAPS["cpu"])[work]
    fits = int(MEMORY_SHARE * free_bytes(device) // bytes_per_row(model, work, tokens, kept))
    return max(1, min(cap, rows, fits))


def exchange_batch_size(model: Any, batch_size: BatchSize, work: Work, exchanges: Sequence[Any], hooks: int = 0) -> int:
    """:func:`fitted_batch_size` for a forward over whole exchanges (prompt and response): capture
    keeping ``hooks`` hooks' activations, or NLL keeping the logits of the longest response."""
    longest = max((len(ex.ids) for ex in exchanges), default=1)
    kept = hooks if work == "capture" else 1 + max((len(ex.response_ids) for ex in exchanges), default=0)
    return fitted_batch_size(model, batch_size, work, len(exchanges), longest, kept)


def bytes_per_row(model: Any, work: Work, tokens: int, kept: int = 1) -> int:
    """An upper estimate of the memory one row of ``tokens`` tokens needs beyond the weights.

    - generation keeps its KV cache, ``2 x layers x kv_heads x head_dim`` values per token;
    - a forward holds about one layer's activations at a time: the residual stream and its copies
      (``8 x d_model``), the MLP's hidden layers (``3 x d_mlp``) and eager attention's scores
      (``heads x tokens`` per token, where the bridge runs instead of the twin);
    - sampling's choice of a token: top-p over the whole vocabulary sorts it in float64 (``64 x
      d_vocab`` bytes with the softmax, the sort and the cumulative sum);
    - the logits of ``kept`` positions in float32 and their log-softmax (``2 x 4 x d_vocab``
      bytes each); capture stops before the unembedding but keeps the activations of ``kept``
      hooks, twice while it stacks them.
    """
    cfg = model.cfg
    size = next(model.parameters()).element_size()
    heads = int(cfg.n_heads)
    kv_heads = int(getattr(cfg, "n_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "d_head", None) or int(cfg.d_model) // heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * int(cfg.d_model))
    layer = tokens * (8 * int(cfg.d_model) + 3 * d_mlp + heads * tokens) * size
    if work == "generate":
        cache = 2 * int(cfg.n_layers) * kv_heads * head_dim * tokens * size
        return cache + layer + 64 * int(cfg.d_vocab)
    if work == "nll":
        return layer + 2 * 4 * int(cfg.d_vocab) * kept
    return layer + 2 * 4 * int(cfg.d_model) * tokens * max(1, kept)


def run_in_batches(n: int, batch_size: int, run: Callable[[int, int], None], what: str) -> None:
    """Call ``run(start, stop)`` over ``range(n)`` in batches; out of memory halves the batch and retries it.

    ``run`` must leave no trace of a batch that raised. The smaller size is kept for the batches
    after it; a batch of one that does not fit raises :class:`BatchMemoryError`.
    """
    start = 0
    while start < n:
        stop = min(n, start + batch_size)
        try:
            run(start, stop)
        except torch.OutOfMemoryError as err:
            if stop - start == 1:
                raise BatchMemoryError(
                    f"{what}: one row does not fit in memory ({_first_line(err)}); use a smaller model, "
                    "dtype bfloat16, fewer max_new_tokens or shorter prompts"
                ) from err
            batch_size = (stop - start) // 2
            _release_cached_memory()
            warnings.warn(f"{what}: out of memory at batch size {stop - start}; retrying at {batch_size}", stacklevel=2)
            continue
        start = stop


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
