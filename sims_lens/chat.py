"""Chat formatting and token spans.

Chat-templated text already starts with the model's BOS (``<|im_start|>`` for SmolLM2), so it is
always encoded with ``add_special_tokens=False``: never a doubled BOS. Prompts are left-padded
for batched generation; a response's span is exactly the tokens the model generated, up to and
including the first end token (:func:`end_token_ids`) when it stopped on its own.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import torch
from jaxtyping import Int
from torch import Tensor

Placement = Literal["system turn", "user turn", "plain text"]
"""Where :func:`chat_text` puts a system instruction (:func:`system_placement`)."""
SYSTEM_TURN: Final = "system turn"
USER_TURN: Final = "user turn"
PLAIN_TEXT: Final = "plain text"

_PROBE = "sims-lens: is this system instruction kept?"


def system_placement(tokenizer: Any) -> Placement:
    """Where a system instruction goes for this tokenizer: ``"system turn"``, ``"user turn"`` or ``"plain text"``.

    ``"plain text"`` without a chat template (base models); ``"system turn"`` when the template
    renders a system message with its content; ``"user turn"`` when it refuses one (Gemma's raises
    "System role not supported") or renders it without its content. Decided by rendering a system
    and a user message once, so the prompting baseline never loses its instruction silently.
    """
    if not getattr(tokenizer, "chat_template", None):
        return PLAIN_TEXT
    from jinja2 import TemplateError  # what rendering a chat template needs anyway

    messages = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError):
        return USER_TURN
    return SYSTEM_TURN if _PROBE in str(text) else USER_TURN


def chat_text(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """The model's chat format for one user turn, ending where the assistant's answer starts.

    A ``system`` instruction goes where :func:`system_placement` says: its own turn; folded into
    the one user turn, before the prompt with a blank line between them, for a template without a
    system role; before the raw prompt as plain text, a blank line between them, without a template.
    """
    placement = system_placement(tokenizer) if system else None
    if placement in (USER_TURN, PLAIN_TEXT):
        prompt, system = f"{system}\n\n{prompt}", None
    if not getattr(tokenizer, "chat_template", None):
        return prompt  # base models without a chat template see the raw prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


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


TURN_END_TOKENS = ("<|eot_id|>", "<end_of_turn>", "<|end|>")
"""Turn-end tokens of other chat formats (Llama 3, Gemma, Phi-3), counted only as special tokens."""


def end_token_ids(tokenizer: Any) -> list[int]:
    """Every token that ends a response, sorted: generation stops at any of them.

    EOS; ``<|im_end|>`` when it is in the vocabulary (ChatML, SmolLM2's turn end); ``<|eot_id|>``,
    ``<end_of_turn>`` and ``<|end|>`` when the tokenizer has them as special tokens; and the
    ``eos_token_id`` of a ``generation_config.json`` next to the tokenizer when it was loaded from
    a local folder (a tokenizer does not carry its model's generation config, so a hub tokenizer
    contributes its tokens only). Only the tokenizer is read, never the model.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        ids.add(int(vocab["<|im_end|>"]))
    special = _special_token_ids(tokenizer)
    ids.update(special[token] for token in TURN_END_TOKENS if token in special)
    ids.update(t for t in _generation_config_eos(tokenizer) if 0 <= t < len(tokenizer))
    return sorted(ids)


def _special_token_ids(tokenizer: Any) -> dict[str, int]:
    """``{token: id}`` of the tokenizer's special tokens (added special tokens and the named ones)."""
    out = {
        str(added.content): int(index)
        for index, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
        if getattr(added, "special", False)
    }
    for token in getattr(tokenizer, "all_special_tokens", ()):
        if token not in out:
            index = tokenizer.convert_tokens_to_ids(token)
            if isinstance(index, int):
                out[token] = index
    return out


def _generation_config_eos(tokenizer: Any) -> list[int]:
    """``eos_token_id`` (an id or a list) of ``generation_config.json`` in the tokenizer's local folder."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if not name:
        return []
    path = Path(name) / "generation_config.json"
    try:
        if not path.is_file():
            return []
        value = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def split_generated(
    sequence: Sequence[int], padded_prompt_width: int, prompt_mask: Sequence[int], eos_ids: Collection[int]
) -> Exchange:
    """Split one row of a batched generation into its prompt and response tokens.

    ``sequence`` is the row of ``generate``'s output (left padding, prompt, generated tokens and
    padding after the end). The response runs up to and including the first end token of any
    kind in ``eos_ids`` (all of :func:`end_token_ids`); a response cut by ``max_new_tokens`` has none.
    """
    ends = {int(t) for t in eos_ids}
    prompt = tuple(int(t) for t, m in zip(sequence[:padded_prompt_width], prompt_mask, strict=True) if m)
    response: list[int] = []
    for token in sequence[padded_prompt_width:]:
        response.append(int(token))
        if int(token) in ends:
            break
    return Exchange(prompt, tuple(response))


def response_ids_for_text(tokenizer: Any, response: str) -> list[int]:
    """Token ids of a response given as text (for samples loaded from disk), ended by EOS."""
    ids = encode_text(tokenizer, response)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids
