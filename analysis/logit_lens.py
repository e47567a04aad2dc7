"""The logit-lens reading of a steering direction: which tokens it promotes and suppresses.

``v`` is read as a residual-stream vector: optionally through the final norm, then the unembedding,
``logits = norm(v) @ W_U``. Biases are left out (``norm(v) - norm(0)``, no ``b_U``): a direction adds
to the residual stream, and a constant offset would rank the same tokens first for every direction.
With the norm (RMSNorm / LayerNorm) the values are those of a unit-scale residual along ``v``, so
they do not grow with the direction's norm; without it they scale linearly with ``v``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.steering.functions import SteeringSet, layer_of


@dataclass
class LensReading:
    """Top-k promoted (highest logit) and suppressed (lowest logit) tokens, with their logits."""

    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]

    def to_frame(self) -> pd.DataFrame:
        """Tidy: ``side`` (promoted / suppressed), ``rank`` (0 = strongest), ``token``, ``value``."""
        rows = [
            {"side": side, "rank": rank, "token": token, "value": value}
            for side, pairs in (("promoted", self.promoted), ("suppressed", self.suppressed))
            for rank, (token, value) in enumerate(pairs)
        ]
        return pd.DataFrame(rows, columns=["side", "rank", "token", "value"])


@torch.no_grad()
def direction_logits(
    model: Any, direction: Float[Tensor, " d_model"], apply_ln: bool = True
) -> Float[Tensor, " d_vocab"]:
    """``norm(v) @ W_U`` without biases, in float32 (``model.W_U`` [d_model, d_vocab] or ``model.unembed``)."""
    param = next(model.parameters())
    v = direction.detach().to(device=param.device, dtype=param.dtype).reshape(1, 1, -1)
    if apply_ln and getattr(model, "ln_final", None) is not None:
        v = model.ln_final(v) - model.ln_final(torch.zeros_like(v))
    w_u = getattr(model, "W_U", None)
    if isinstance(w_u, Tensor):
        return (v.reshape(-1).float() @ w_u.detach().float()).cpu()
    unembed = model.unembed
    return (unembed(v) - unembed(torch.zeros_like(v))).reshape(-1).float().cpu()


def logit_lens(
    model: Any,
    direction: Float[Tensor, " d_model"],
    k: int = 10,
    tokenizer: Any = None,
    apply_ln: bool = True,
) -> LensReading:
    """The ``k`` tokens ``direction`` promotes most and the ``k`` it suppresses most, as strings."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("logit_lens needs a tokenizer (pass tokenizer=, or use a model that carries one)")
    logits = direction_logits(model, direction, apply_ln)
    k = min(k, logits.shape[0])
    top, bottom = logits.topk(k), (-logits).topk(k)
    return LensReading(
        promoted=[(_token(tokenizer, int(i)), float(v)) for v, i in zip(top.values, top.indices, strict=True)],
        suppressed=[(_token(tokenizer, int(i)), -float(v)) for v, i in zip(bottom.values, bottom.indices, strict=True)],
    )


def steering_lens(
    model: Any,
    steering: SteeringSet,
    k: int = 10,
    tokenizer: Any = None,
    apply_ln: bool = True,
    hooks: Iterable[str] | None = None,
) -> pd.DataFrame:
    """:func:`logit_lens` of every steered hook's direction, tidy: ``hook, layer, side, rank, token, value``."""
    frames = []
    for hook in hooks if hooks is not None else steering.functions:
        frame = logit_lens(model, steering.direction(hook), k, tokenizer, apply_ln).to_frame()
        frame.insert(0, "layer", layer_of(hook))
        frame.insert(0, "hook", hook)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["hook", "layer", "side", "rank", "token", "value"])
    return pd.concat(frames, ignore_index=True)


def _token(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))
