"""Mean difference (CAA, ActAdd): the vector from the negative to the positive mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from jaxtyping import Float
from torch import Tensor

from sims_lens.steering.functions import SteeringFunction
from sims_lens.steering.learners.base import check_activations, register_learner


def mean_difference(pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"]) -> Float[Tensor, " d"]:
    """``mean(pos) - mean(neg)``: the shift that maps the negative mean onto the positive one."""
    return pos.mean(dim=0) - neg.mean(dim=0)


@register_learner("mean_diff")
@dataclass
class MeanDiffLearner:
    """CAA / ActAdd: ``v = mean(H+) - mean(H-)``, applied as ``h + m v``.

    The simplest steering function and the reference point for the others: at ``m = 1`` it
    moves the mean negative activation exactly onto the mean positive one.
    """

    name: ClassVar[str] = "mean_diff"
    inputs: ClassVar[str] = "samples"

    def fit(self, pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"], hook: str) -> SteeringFunction:
        pos, neg = check_activations(pos, neg, learner=self.name)
        vector = mean_difference(pos, neg)
        return SteeringFunction(
            edit="add",
            hook=hook,
            params={"vector": vector},
            learner=self.name,
            extra={"n_pos": pos.shape[0], "n_neg": neg.shape[0], "norm": float(vector.norm())},
        )
