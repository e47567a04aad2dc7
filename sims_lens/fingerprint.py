"""A digest of a model's weights that costs one pass over them once, and a few reads per tensor after.

The answer cache keys every entry by the weights it was computed with (:mod:`sims_lens.answer_cache`).
A full pass over the weights takes 0.13 s at 135M parameters on this CPU and tens of seconds at 8B,
and the key is asked for on every cached call, so :func:`model_fingerprint` keeps each tensor's
sums and recomputes them only for a tensor that changed. A tensor counts as unchanged while

- its storage (``data_ptr``), shape, dtype and device are the same,
- torch's version counter is the same: every in-place edit through the tensor itself (an optimizer
  step, ``copy_``, ``w[i] = x`` or ``add_`` under ``no_grad``, ``load_state_dict``) bumps it,
- and :data:`PROBE` elements spread evenly over it are the same.

Inference tensors (made under ``torch.inference_mode``) have no version counter: they are read in
full every time.

Edits through ``.data`` bypass the version counter (``w.data`` is a new tensor with its own): the
probe sees those that touch a probed element or change many (a scaled row, a whole matrix copied
in), but a single edited element elsewhere goes unseen. After such an edit call :func:`forget` (or
edit through the tensor under ``torch.no_grad()``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

PROBE = 256
"""Elements read per tensor to notice edits the version counter misses."""
_CHUNK = 1 << 20


@dataclass
class _Known:
    """What was last seen of one tensor: enough to tell, cheaply, that it has not changed."""

    stamp: tuple[Any, ...]
    probe: Tensor
    sums: list[float]


_KNOWN: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""By tensor (its identity, held weakly: an entry goes with its tensor)."""


def model_fingerprint(model: Any) -> str:
    """A digest of every parameter and buffer: name, shape, dtype, and per tensor its sum, sum of
    squares and a dot product with fixed pseudo-random weights (which order-only changes, such as
    swapped rows, do move), accumulated over chunks.

    For weights that differ anywhere the digest differs with overwhelming probability: two
    checkpoints, a fine-tuned copy, another dtype. The sums of a tensor are computed again only when
    it changed (module docstring): a second call on unchanged weights reads :data:`PROBE` elements
    per tensor.
    """
    module = getattr(model, "original_model", model)
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype), _sums_of(tensor)]).encode())
    return digest.hexdigest()


def forget(model: Any | None = None) -> None:
    """Drop what is known of ``model``'s tensors (all models' when None): the next fingerprint reads them all."""
    if model is None:
        _KNOWN.clear()
        return
    module = getattr(model, "original_model", model)
    for tensor in [*module.parameters(), *module.buffers()]:
        _KNOWN.pop(tensor, None)


def _sums_of(tensor: Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1)
    if tensor.is_inference():  # no version counter to trust: read it every time
        return tensor_sums(flat)
    stamp = (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype, tensor.device)
    probe = flat[_probe_index(flat.numel(), flat.device)].clone()
    known = _KNOWN.get(tensor)
    if known is not None and known.stamp == stamp and torch.equal(known.probe, probe):
        return known.sums
    sums = tensor_sums(flat)
    _KNOWN[tensor] = _Known(stamp, probe, sums)
    return sums


def tensor_sums(flat: Tensor) -> list[float]:
    """One pass over ``flat``: its sum, sum of squares and dot product with :func:`_pseudo_random`."""
    weights = _pseudo_random(flat.device)
    sums = [0.0, 0.0, 0.0]
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].float()
        sums[0] += float(chunk.sum(dtype=torch.float64))
        sums[1] += float(torch.dot(chunk, chunk))
        sums[2] += float(torch.dot(chunk, weights[: chunk.numel()]))
    return sums


@cache
def _probe_index(numel: int, device: torch.device) -> Tensor:
    """:data:`PROBE` flat indices spread evenly from the first element to the last (all of a small tensor)."""
    if numel <= PROBE:
        return torch.arange(numel, device=device)
    return torch.arange(PROBE, dtype=torch.int64, device=device) * (numel - 1) // (PROBE - 1)


@cache
def _pseudo_random(device: torch.device) -> Tensor:
    """``_CHUNK`` fixed float32 weights in [0.5, 1.5): the same on every machine (an integer hash, no RNG)."""
    index = torch.arange(_CHUNK, dtype=torch.int64, device=device)
    return (0.5 + ((index * 2654435761) % 4294967296).double() / 4294967296).float()
