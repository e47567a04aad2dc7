"""The base model's activations of one batch of D+ / D- pairs: the one type the loop, run folder and analysis share.

Row ``i`` of every field is pair ``i`` (``prompt_ids[i]`` is its prompt, which cross-validation
folds never split). Two views of the same forward pass: the response tokens at the *steered*
hooks (what the learner fits; kept per token, since HPR pairs tokens by position), and each
sample's mean over those tokens at every *observed* hook (what analysis compares across layers).
A run folder keeps the observed view only (``observed/iter_NNN.safetensors``), so a loaded one has
no steered hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.capture import reduce_tokens
from sims_lens.steering.functions import layer_of


def _nothing() -> Tensor:
    return torch.zeros(0, 0, 0)


@dataclass(frozen=True, eq=False)
class PairActivations:
    """D+ / D- activations of one iteration's pairs (see the module docstring)."""

    iteration: int
    prompt_ids: list[str]
    """The prompt of every pair."""
    hooks: list[str] = field(default_factory=list)
    """The steered hook points."""
    positives: list[Float[Tensor, "n_tokens n_hooks d_model"]] = field(default_factory=list)
    """Per pair, the positive response's token activations at ``hooks``."""
    negatives: list[Float[Tensor, "n_tokens n_hooks d_model"]] = field(default_factory=list)
    observed_hooks: list[str] = field(default_factory=list)
    """The observed hook points (config ``observe``), whatever the steered ones are."""
    observed_positives: Float[Tensor, "n_pairs n_observed d_model"] = field(default_factory=_nothing)
    """Per pair, the positive response's mean activation at every observed hook."""
    observed_negatives: Float[Tensor, "n_pairs n_observed d_model"] = field(default_factory=_nothing)

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        if len(self.positives) != len(self.negatives) or (self.hooks and len(self.positives) != n):
            raise ValueError(
                f"{len(self.positives)} positive and {len(self.negatives)} negative token sets for {n} pairs; "
                "give one of each per pair"
            )
        pos, neg = self.observed_positives, self.observed_negatives
        if not self.observed_hooks:
            return
        if pos.ndim != 3 or pos.shape != neg.shape:
            raise ValueError(
                "observed activations must be paired [n_pairs, n_observed, d_model] alike, got "
                f"{tuple(pos.shape)} and {tuple(neg.shape)}"
            )
        if pos.shape[1] != len(self.observed_hooks):
            raise ValueError(f"{pos.shape[1]} observed layers of activations but {len(self.observed_hooks)} hook names")
        if pos.shape[0] != n:
            raise ValueError(f"{n} prompt ids for {pos.shape[0]} pairs of observed activations")

    @property
    def n_pairs(self) -> int:
        return len(self.prompt_ids)

    @property
    def observed_layers(self) -> list[int]:
        """The layer of every observed hook."""
        return [layer for hook in self.observed_hooks if (layer := layer_of(hook)) is not None]

    def reduced(self, reduction: str = "mean") -> tuple[Float[Tensor, "n_pairs n_hooks d_model"], Tensor]:
        """Each sample's steered-hook tokens reduced to one row (``mean`` or ``last``): D+ and D-."""
        return reduce_tokens(self.positives, reduction), reduce_tokens(self.negatives, reduction)

    def at_hooks(self, keep: list[int]) -> PairActivations:
        """The same pairs with the steered hooks at positions ``keep`` only (the observed ones stay)."""
        return replace(
            self,
            hooks=[self.hooks[i] for i in keep],
            positives=[t[:, keep] for t in self.positives],
            negatives=[t[:, keep] for t in self.negatives],
        )
