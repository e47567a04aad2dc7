"""A Hugging Face sequence-classification reward model as the oracle.

Any ``AutoModelForSequenceClassification`` checkpoint, by hub name or local folder (written by
``save_pretrained``). Each (prompt, response) is rendered with the reward tokenizer's chat template
(a user turn and an assistant turn) when it has one, else as ``"prompt\\n\\nresponse"``; the score
is the logit of label ``label_index`` (label 0 for a single-output reward head). Batches are padded
on the right, so absolute positions match the unpadded text and batched scores equal one-by-one scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from sims_lens.groups import regroup
from sims_lens.models import ModelLoadError, parse_dtype
from sims_lens.oracles.base import check_inputs, register_oracle
from sims_lens.validation import check_int, check_text


def load_classifier(name_or_path: str, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """Load a sequence-classification model and its tokenizer from a local folder or the hub."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(name_or_path).expanduser()
    local = path.is_dir()
    if not local and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise ModelLoadError(
            f"reward model folder {name_or_path!r} does not exist; pass a folder written by save_pretrained "
            "or a Hugging Face hub name"
        )
    source = str(path) if local else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, dtype=parse_dtype(dtype))
    except OSError as err:
        if not local:
            first = (str(err).strip().splitlines() or [""])[0]
            raise ModelLoadError(
                f"could not load the reward model {name_or_path!r} from the Hugging Face hub ({type(err).__name__}: "
                f"{first}). Offline, save the model with save_pretrained elsewhere and pass its local folder instead"
            ) from err
        raise ModelLoadError(f"could not load a sequence-classification model from {str(path)!r}: {err}") from err
    return model.to(device).eval(), tokenizer


@register_oracle("reward_model")
@dataclass
class RewardModel:
    """Scores each (prompt, response) with a sequence-classification reward model.

    Settings: ``name_or_path`` (hub name or local folder), ``label_index`` (which logit is the
    reward), ``batch_size``, ``max_length`` (tokens; longer texts are truncated), ``dtype``,
    ``device``, ``use_chat_template`` (use the reward tokenizer's chat template where it has one).
    """

    name: ClassVar[str] = "reward_model"
    relative: ClassVar[bool] = False
    """Scores compare across calls (prompts, iterations): an absolute oracle."""
    name_or_path: str
    label_index: int = 0
    batch_size: int = 8
    max_length: int = 1024
    dtype: str = "float32"
    device: str = "cpu"
    use_chat_template: bool = True
    classifier: Any = field(default=None, init=False, repr=False)
    reward_tokenizer: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_text(self.name, name_or_path=self.name_or_path)
        check_int(self.name, 0, label_index=self.label_index)
        check_int(self.name, 1, batch_size=self.batch_size, max_length=self.max_length)
        parse_dtype(self.dtype)
        if not isinstance(self.use_chat_template, bool):
            raise ValueError(
                f"reward_model: setting 'use_chat_template' must be true or false, got {self.use_chat_template!r}"
            )
        self.classifier, self.reward_tokenizer = load_classifier(self.name_or_path, self.dtype, self.device)
        labels = int(self.classifier.config.num_labels)
        if self.label_index >= labels:
            raise ValueError(
                f"reward_model: label_index {self.label_index} is out of range; "
                f"{self.name_or_path!r} has {labels} label(s)"
            )
        tok = self.reward_tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if self.classifier.config.pad_token_id is None:
            self.classifier.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"

    def format(self, prompt: str, response: str) -> str:
        """The text the reward model reads for one (prompt, response)."""
        tok = self.reward_tokenizer
        if self.use_chat_template and getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return str(tok.apply_chat_template(messages, tokenize=False))
        return f"{prompt}\n\n{response}"

    def _encode(self, text: str) -> list[int]:
        tok = self.reward_tokenizer
        bos = tok.bos_token
        templated = self.use_chat_template and getattr(tok, "chat_template", None)
        # A chat template writes its own BOS; plain text gets the tokenizer's special tokens (e.g. [CLS] ... [SEP]).
        special = not (templated and bos is not None and text.startswith(bos))
        ids = tok(text, add_special_tokens=special, truncation=True, max_length=self.max_length)["input_ids"]
        return list(ids)

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """The reward of each already formatted text, in batches padded on the right."""
        encoded = [self._encode(t) for t in texts]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        pad_id = int(self.reward_tokenizer.pad_token_id)
        device = next(self.classifier.parameters()).device
        out = [0.0] * len(texts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, : len(encoded[i])] = 1
            logits = self.classifier(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            values = logits[:, self.label_index].float().cpu().tolist()
            for i, value in zip(rows, values, strict=True):
                out[i] = float(value)
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        check_inputs(prompts, responses, self.name)
        texts = [self.format(p, r) for p, group in zip(prompts, responses, strict=True) for r in group]
        flat = self.score_texts(texts)
        return regroup(flat, responses)
