"""A tiny random-weight chat model for fast tests, built offline from a config.

It has SmolLM2's architecture (Llama), chat format and special tokens, a byte-level BPE tokenizer
trained in memory on a short built-in text, and the same TransformerLens hook-point names as the
real model, so code that runs on it runs on the embedded model.
"""

from __future__ import annotations

from typing import Any

import torch

from sims_lens.models import boot_bridge, prepare_tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is lovely.
Write a short poem about the sea. Tell me a story about a dragon and a brave knight.
I am happy, sad, angry, calm, excited and grateful. Thank you so much, that is wonderful!
How do I cook rice? Boil water, add rice, wait twenty minutes. Numbers: 0 1 2 3 4 5 6 7 8 9.
Explain gravity to a child. Give me three tips for better sleep. What time is it in Tokyo?
You are a helpful assistant. user assistant system. Yes, no, maybe. Good, bad, great, terrible.
"""


def tiny_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer with SmolLM2's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    # TransformerLens re-loads a tokenizer by name unless it already claims add_bos_token; our chat
    # text carries its own BOS, and sims_lens always encodes with add_special_tokens=False.
    fast.init_kwargs.update(name_or_path="sims-lens/tiny-llama", add_bos_token=True)
    return prepare_tokenizer(fast)


def tiny_model(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.02,
) -> tuple[Any, Any]:
    """A random-weight Llama inside a TransformerBridge, and its tokenizer; no download.

    ``init_std`` is the weights' standard deviation: the default gives near-uniform next-token
    distributions, a larger one (0.3) a peaked model whose text a large edit visibly breaks.
    """
    model, tokenizer = tiny_hf_model(n_layers, d_model, n_heads, seed, dtype, init_std)
    return boot_bridge(model, tokenizer, "sims-lens/tiny-llama", dtype, "cpu"), tokenizer


def tiny_hf_model(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.02,
) -> tuple[Any, Any]:
    """The plain Hugging Face Llama that :func:`tiny_model` wraps (same weights for the same seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=init_std,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.to(dtype)  # type: ignore[arg-type]  # transformers' stubs do not know dtypes
    model.eval()
    return model, tokenizer
