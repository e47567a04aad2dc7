"""Chat formatting: where a system instruction goes (its own turn, the user turn, plain text), never dropped."""

from __future__ import annotations

import pytest
import torch

from sims_lens.chat import PLAIN_TEXT, SYSTEM_TURN, USER_TURN, chat_text, encode_chat, system_placement
from sims_lens.generation import precise_dtype
from sims_lens.tiny import CHAT_TEMPLATE, tiny_tokenizer

INSTRUCTION = "Answer warmly."
PROMPT = "What is the capital of France?"

NO_SYSTEM_ROLE = (  # Gemma's way: a system message is an error
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
DROPS_SYSTEM = (  # renders a system message without its content
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(template: str | None):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def test_a_template_with_a_system_role_gives_the_instruction_its_own_turn() -> None:
    tokenizer = _tokenizer(CHAT_TEMPLATE)
    assert system_placement(tokenizer) == SYSTEM_TURN
    text = chat_text(tokenizer, PROMPT, INSTRUCTION)
    assert text.startswith(f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>")
    assert chat_text(tokenizer, PROMPT) == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def test_without_a_chat_template_the_instruction_precedes_the_prompt_as_plain_text() -> None:
    tokenizer = _tokenizer(None)
    assert system_placement(tokenizer) == PLAIN_TEXT
    base, prompting = chat_text(tokenizer, PROMPT), chat_text(tokenizer, PROMPT, INSTRUCTION)
    assert base == PROMPT
    assert prompting != base and prompting == f"{INSTRUCTION}\n\n{PROMPT}"
    assert encode_chat(tokenizer, PROMPT, INSTRUCTION) != encode_chat(tokenizer, PROMPT)


@pytest.mark.parametrize("template", [NO_SYSTEM_ROLE, DROPS_SYSTEM], ids=["raises", "drops"])
def test_a_template_without_a_system_role_folds_the_instruction_into_the_user_turn(template: str) -> None:
    tokenizer = _tokenizer(template)
    assert system_placement(tokenizer) == USER_TURN
    text = chat_text(tokenizer, PROMPT, INSTRUCTION)  # no TemplateError
    user_turn = f"user\n{INSTRUCTION}\n\n{PROMPT}"
    assert user_turn in text and text.count(INSTRUCTION) == 1
    assert chat_text(tokenizer, PROMPT) != text


# -- no float64 on MPS (the prompting baseline on a Mac) ------------------------------------------


def test_precise_dtype_is_float64_except_on_mps() -> None:
    assert precise_dtype(torch.device("mps")) == torch.float32 and precise_dtype("mps") == torch.float32
    assert precise_dtype(torch.device("cpu")) == torch.float64 and precise_dtype("cuda:0") == torch.float64
