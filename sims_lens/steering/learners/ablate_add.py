"""Ablate-then-add: repel the dispreferred direction by projection, attract by the mean difference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.steering.functions import SteeringFunction
from sims_lens.steering.learners.base import check_activations, register_learner, unit
from sims_lens.steering.learners.mean_diff import mean_difference


def negative_direction(
    pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"], *, rtol: float = 1e-6
) -> Float[Tensor, " d"]:
    """Unit direction of what the negative mean has and the positive mean lacks.

    ``u = unit(mn - (mn . p) p)`` with ``mn = mean(neg)`` and ``p = unit(mean(pos))``: the part of the
    negative mean orthogonal to the positive mean. Equivalently ``-unit`` of the part of
    ``v = mean(pos) - mean(neg)`` orthogonal to ``mean(pos)``: it differs from ``-unit(v)`` by the
    component of ``v`` along ``mean(pos)`` (e.g. the two sets differing in norm) and equals it when
    ``v`` is orthogonal to ``mean(pos)``. Zeros (no ablation) when ``mean(neg)`` is parallel to
    ``mean(pos)``.
    """
    mean_neg = neg.mean(dim=0)
    p = unit(pos.mean(dim=0))
    residual = mean_neg - (mean_neg @ p) * p
    if float(residual.norm()) <= rtol * max(float(mean_neg.norm()), 1e-30):
        return torch.zeros_like(mean_neg)
    return unit(residual)


@register_learner("ablate_add")
@dataclass
class AblateAddLearner:
    """The paper's pair ``f'_l`` (repel the dispreferred) then ``f_l`` (attract the preferred).

    Edit (``functions._edit_ablate_add``): ``h' = h + m (v - (h . u) u)`` with ``v = mean(pos) -
    mean(neg)`` (as mean_diff) and ``u`` from :func:`negative_direction`, the dispreferred-only part
    of the negative mean. Why this ``u``:

    - it is orthogonal to ``mean(pos)``, so on the average preferred activation the ablation is a
      no-op, and the repulsion acts in proportion to how much of the dispreferred component an
      activation carries (a fixed subtraction would push activations that lack it just as far);
    - the mean-based alternatives are exactly parallel to ``v``: ``unit(mean(neg) - mean(pos))`` and
      ``unit(mean(neg) - mean(all))`` are both ``-unit(v)``; ``u`` departs from ``-unit(v)`` by the
      part of ``v`` along ``mean(pos)``. It approaches ``-unit(v)`` when ``v`` is orthogonal to
      ``mean(pos)`` (common in high dimension); the edit then still differs from adding ``v``: it
      sets every activation's ``u`` coordinate to ``v . u`` instead of shifting it.
    - directions from second moments (where negatives carry more energy than positives) would not
      be tied to ``v`` at all, but with a few dozen samples in hundreds of dimensions they fit noise.

    At ``m = 1`` every activation's ``u`` coordinate becomes ``v . u = -(mean(neg) . u)`` and the rest
    is shifted by ``v``, so the mean negative activation lands at ``mean(pos) + (v . u) u``: past the
    positive mean, away from the dispreferred component.
    """

    name: ClassVar[str] = "ablate_add"
    inputs: ClassVar[str] = "samples"

    def fit(self, pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"], hook: str) -> SteeringFunction:
        pos, neg = check_activations(pos, neg, learner=self.name)
        vector = mean_difference(pos, neg)
        ablate = negative_direction(pos, neg)
        cosine = float(torch.nn.functional.cosine_similarity(ablate, vector, dim=0)) if ablate.any() else 0.0
        return SteeringFunction(
            edit="ablate_add",
            hook=hook,
            params={"vector": vector, "ablate": ablate},
            learner=self.name,
            extra={"norm": float(vector.norm()), "cos_ablate_vector": cosine},
        )
