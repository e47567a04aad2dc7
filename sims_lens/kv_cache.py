"""A KV cache that writes each step's keys and values into room reserved ahead, instead of concatenating.

Hugging Face's ``DynamicCache`` grows every layer's keys and values with ``torch.cat`` at every
decoding step: a copy of the whole cache per step (at batch 64 and 80 positions, ~240 MB per step
for the embedded model's 30 layers). :func:`growing_cache` is a ``DynamicCache`` whose full-attention
layers are :class:`GrowingLayer`: they reserve ``reserve`` more positions when they are first
filled, write new positions in place and hand attention views of the filled part, so a step copies
only its own token's keys and values (ARCHITECTURE.md, "Sampling"). Sliding-window layers (other
architectures) keep Hugging Face's own layer. The attention sees the same keys and values either way.
Offloading the cache to the CPU (``DynamicCache(offloading=True)``) is not supported by these layers.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KV = Float[Tensor, "batch kv_heads pos head_dim"]


class GrowingLayer(DynamicLayer):
    """One layer's keys and values in buffers with room for ``reserve`` more positions; views of the filled part."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = int(reserve)
        self.length = 0
        self._keys: Tensor | None = None
        self._values: Tensor | None = None

    def update(self, key_states: KV, value_states: KV, *args: Any, **kwargs: Any) -> tuple[KV, KV]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._keys is None or self._values is None or self.length + n > self._keys.shape[-2]:
            self._resize(key_states, value_states, self.length + n + self.reserve)
        assert self._keys is not None and self._values is not None
        self._keys[:, :, self.length : self.length + n] = key_states
        self._values[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._expose()
        return self.keys, self.values  # type: ignore[return-value]

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep (and reorder, or repeat) the rows ``beam_idx``: the sampler's shared prefill and dropped rows."""
        if self._keys is None or self._values is None:
            return
        index = beam_idx.to(self._keys.device)
        self._keys, self._values = self._keys.index_select(0, index), self._values.index_select(0, index)
        self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        index = torch.as_tensor(indices)
        if index.dtype == torch.bool:  # a row mask, as DynamicLayer's keys[indices] accepts
            index = index.nonzero().squeeze(-1)
        self.reorder_cache(index.long())  # type: ignore[arg-type]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._keys is None or self._values is None:
            return
        rows = torch.arange(self._keys.shape[0], device=self._keys.device).repeat_interleave(repeats)
        self.reorder_cache(rows)  # type: ignore[arg-type]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self._keys is None or tokens_to_remove == 0:
            return
        self.length = max(0, self.length + tokens_to_remove)
        self._expose()

    def reset(self) -> None:
        self._keys = self._values = None
        self.length = 0
        super().reset()

    def _resize(self, key_states: KV, value_states: KV, capacity: int) -> None:
        batch, heads, _, dim = key_states.shape
        keys = key_states.new_empty(batch, heads, capacity, dim)
        values = value_states.new_empty(batch, heads, capacity, value_states.shape[-1])
        if self._keys is not None and self._values is not None and self.length:
            keys[:, :, : self.length] = self._keys[:, :, : self.length]
            values[:, :, : self.length] = self._values[:, :, : self.length]
        self._keys, self._values = keys, values

    def _expose(self) -> None:
        assert self._keys is not None and self._values is not None
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]


def growing_cache(config: Any, reserve: int) -> DynamicCache:
    """A ``DynamicCache`` for a model of ``config`` whose full-attention layers are :class:`GrowingLayer`."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
