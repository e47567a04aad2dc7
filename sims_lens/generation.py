"""Batched, KV-cached generation with left padding, under whatever steering hooks are active.

The current policy is the model plus the steering hooks attached around the call, so the same
function samples from pi_0 (no hooks) and pi_t (``with apply_steering(...)``). Positions are
tracked so that position-aware steering never touches left padding.

A row stops at the first of *any* of its end tokens (:func:`sims_lens.chat.end_token_ids`: EOS,
the chat turn end and the others the tokenizer knows), which TransformerBridge 4.3's ``generate``
takes as a list (``eos_token_id=[...]``); the response span runs up to and including that token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sims_lens.chat import Exchange, encode_chat, end_token_ids, left_pad, split_generated
from sims_lens.seeds import derive_seed
from sims_lens.steering.positions import track_positions


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample: ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 40
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    use_kv_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@torch.no_grad()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings = GenerationSettings(),
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Exchange]:
    """Generate one response per prompt (token ids in, exchanges out), in left-padded batches.

    Each row stops at the first token of :func:`~sims_lens.chat.end_token_ids` (all of them, not
    just EOS) or after ``max_new_tokens``; finished rows of a batch are padded until the rest end.
    """
    eos = end_token_ids(tokenizer)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0))
    device = next(model.parameters()).device
    out: list[Exchange] = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start : start + settings.batch_size]
        ids, mask = left_pad(chunk, pad_id)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(derive_seed(seed, "batch", start))
            with track_positions(model, mask):
                tokens = model.generate(
                    ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=settings.max_new_tokens,
                    do_sample=settings.temperature > 0,
                    temperature=settings.temperature if settings.temperature > 0 else 1.0,
                    top_p=settings.top_p if settings.temperature > 0 and settings.top_p < 1 else None,
                    eos_token_id=eos or None,  # a list: TransformerBridge stops a row at any of them
                    stop_at_eos=bool(eos),
                    use_past_kv_cache=settings.use_kv_cache,
                    return_type="tokens",
                    verbose=False,
                )
        for row in range(len(chunk)):
            out.append(split_generated(tokens[row].tolist(), ids.shape[1], mask[row].tolist(), eos))
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    seed: int | None = None,
    system: str | None = None,
) -> list[str]:
    """Chat-format user prompts, generate, and return the decoded responses."""
    exchanges = generate_ids(model, tokenizer, [encode_chat(tokenizer, p, system) for p in prompts], settings, seed)
    return [decode_response(tokenizer, ex) for ex in exchanges]


def decode_response(tokenizer: Any, exchange: Exchange) -> str:
    return str(tokenizer.decode(list(exchange.response_ids), skip_special_tokens=True)).strip()
