"""RepE-style PCA: the top principal direction of the paired differences ``pos[i] - neg[i]``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.steering.functions import SteeringFunction
from sims_lens.steering.learners.base import check_activations, register_learner
from sims_lens.steering.learners.mean_diff import mean_difference


def first_principal_direction(diffs: Float[Tensor, "n d"]) -> Float[Tensor, " d"]:
    """Unit top right-singular vector of ``diffs`` (uncentered PCA), sign arbitrary."""
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    top: Tensor = vh[0]
    return top.to(diffs.dtype)


@register_learner("pca")
@dataclass
class PCALearner:
    """RepE: first principal component of the paired differences, scaled like the mean difference.

    ``u`` is the top eigenvector of the *uncentered* second moment ``E[d d^T]`` of the differences
    ``d_i = pos[i] - neg[i]``. RepE centers the differences, but only after shuffling each pair's
    order at random, which turns ``{d_i}`` into the sign-symmetric set ``{+-d_i}``: its mean is zero
    and its covariance is exactly the uncentered ``E[d d^T]``. Centering our ordered differences
    instead would subtract their mean and with it the consistent signal: when ``d_i = v + noise``
    the centered top component is the noise's, while the uncentered one is ``v``'s whenever
    ``||v||^2`` exceeds the noise's top variance.

    The sign is set so ``u`` points from negative to positive (``u . (mean(pos) - mean(neg)) >= 0``)
    and the vector is ``||mean(pos) - mean(neg)|| * u``, so its size is comparable with mean_diff's.
    Needs paired rows (``pos[i]`` and ``neg[i]`` from the same prompt).
    """

    name: ClassVar[str] = "pca"
    inputs: ClassVar[str] = "samples"

    def fit(self, pos: Float[Tensor, "n d"], neg: Float[Tensor, "n d"], hook: str) -> SteeringFunction:
        pos, neg = check_activations(pos, neg, paired=True, learner=self.name)
        direction = mean_difference(pos, neg)
        diffs = pos - neg
        u = first_principal_direction(diffs)
        if float(u @ direction) < 0:
            u = -u
        explained = float((diffs @ u).pow(2).sum() / diffs.pow(2).sum().clamp_min(1e-30))
        cosine = float(torch.nn.functional.cosine_similarity(u, direction, dim=0))
        return SteeringFunction(
            edit="add",
            hook=hook,
            params={"vector": direction.norm() * u},
            learner=self.name,
            extra={"n_pairs": pos.shape[0], "explained_fraction": explained, "cos_mean_diff": cosine},
        )
