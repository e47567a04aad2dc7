"""Linear layers multiplying by oneDNN-prepacked copies of their weights, for float32 on the CPU.

Decoding multiplies a few dozen rows by every weight matrix once per step. On this project's AMD
EPYC machines MKL's ``sgemm`` (what ``F.linear`` calls on the CPU) runs such skinny products at
about half the rate it reaches on square ones; oneDNN with the weight reordered once into its
blocked layout runs them about twice as fast (embedded model, 2 cores, batch 64: 74 against 189
GFLOP/s for the unembedding, 88 against 185 for the MLP; BENCHMARKS.md). Inside
:func:`packed_linears` every float32 ``nn.Linear`` of the given modules reorders its weight on its
first call and multiplies by the copy after that.

The copies are made inside the block and dropped on exit, so a weight edited between two blocks
(in place, through ``.data``, anywhere) is always read fresh: packing the embedded model's 135M
weights takes about 0.15 s, a small part of a generation. The products equal ``F.linear``'s up to
float32 rounding (a different summation order: ~1e-6 relative); greedy text is the same. Outside
float32 on the CPU, without oneDNN (or its reorder), under autograd, for a layer whose
``forward`` is already replaced (accelerate's hooks, a user's patch), or where the copies would
not fit in half of the free memory, nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sims_lens.memory import free_bytes


def packing_applies(weight: Tensor) -> bool:
    """Whether :func:`packed_linears` would pack ``weight``: float32, on the CPU, with oneDNN built in."""
    return (
        weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
    )


@contextmanager
def packed_linears(*modules: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, the float32 CPU ``nn.Linear`` layers of ``modules`` use prepacked weights.

    A weight shared by several layers (a twin and its bridge, a tied unembedding) is packed once.
    Yields how many layers were switched (0 where packing does not apply); on exit, also after an
    error, every layer is back to its own ``forward``.
    """
    linears = [
        m
        for module in modules
        for m in module.modules()
        # a forward of its own: switched by an outer block, or replaced by someone else; left be
        if type(m) is nn.Linear and "forward" not in m.__dict__ and packing_applies(m.weight)
    ]
    linears = list({id(m): m for m in linears}.values())
    weights = {id(m.weight): m.weight for m in linears}
    size = sum(w.numel() * w.element_size() for w in weights.values())
    if not enabled or not linears or 2 * size > free_bytes(torch.device("cpu")):
        yield 0
        return
    # by id of the weight, packed on first use (a capture never uses the unembedding)
    packed: dict[int, Tensor | None] = {}
    try:
        for m in linears:
            m.forward = partial(_packed_forward, m, packed)  # type: ignore[method-assign]
        yield len(linears)
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


def _packed_forward(layer: nn.Linear, packed: dict[int, Tensor | None], x: Tensor) -> Tensor:
    """``layer(x)`` through the packed weight; the plain product where autograd or the input needs it."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or (torch.is_grad_enabled() and _needs_grad(layer, x)):
        return F.linear(x, layer.weight, layer.bias)
    key = id(layer.weight)
    if key not in packed:
        try:
            packed[key] = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 64)
        except (RuntimeError, AttributeError, NotImplementedError):  # a build whose oneDNN lacks the op
            packed[key] = None
    weight = packed[key]
    if weight is None:
        return F.linear(x, layer.weight, layer.bias)
    bias: Any = None if layer.bias is None else layer.bias.detach()
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def _needs_grad(layer: nn.Linear, x: Tensor) -> bool:
    return x.requires_grad or layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad)
