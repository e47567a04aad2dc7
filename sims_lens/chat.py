"""Chat formatting and token spans.

Chat-templated text already starts with the model's BOS (``<|im_start|>`` for SmolLM2), so it is
always encoded with ``add_special_tokens=False``: never a doubled BOS. Prompts are left-padded
for batched generation; a response's span is exactly the tokens the model generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor


def chat_text(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """The model's chat format for one user turn, ending where the assistant's answer starts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return prompt  # base models without a chat template see the raw prompt


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of already formatted text, without adding special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a chat-formatted user prompt (one BOS, from the template)."""
    return encode_text(tokenizer, chat_text(tokenizer, prompt, system))


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-pad token id lists into ``(input_ids, attention_mask)``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


@dataclass(frozen=True)
class Exchange:
    """A prompt and a response as token ids; the response span is ``[len(prompt_ids), len(ids))``."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.response_ids

    @property
    def response_span(self) -> tuple[int, int]:
        return len(self.prompt_ids), len(self.prompt_ids) + len(self.response_ids)


def split_generated(
    sequence: Sequence[int], padded_prompt_width: int, prompt_mask: Sequence[int], eos_ids: Sequence[int]
) -> Exchange:
    """Split one row of a batched generation into its prompt and response tokens.

    ``sequence`` is the row of ``generate``'s output (left padding, prompt, generated tokens and
    padding after the end). The response runs up to and including the first end token.
    """
    prompt = tuple(int(t) for t, m in zip(sequence[:padded_prompt_width], prompt_mask, strict=True) if m)
    response: list[int] = []
    for token in sequence[padded_prompt_width:]:
        response.append(int(token))
        if int(token) in eos_ids:
            break
    return Exchange(prompt, tuple(response))


def response_ids_for_text(tokenizer: Any, response: str) -> list[int]:
    """Token ids of a response given as text (for samples loaded from disk), ended by EOS."""
    ids = encode_text(tokenizer, response)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids
