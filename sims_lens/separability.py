"""How separable H+ and H- are at one hook: held-out probe accuracy and Fisher's ratio.

The one home of these measures: the loop ranks layers by :func:`probe_accuracy` (``layers =
"top:K"``) and logs both per layer; ``analysis.separability`` tabulates them.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from sklearn.model_selection import train_test_split
from torch import Tensor

from sims_lens.steering.learners.base import check_activations, unit
from sims_lens.steering.learners.mean_diff import mean_difference
from sims_lens.steering.learners.probe import fit_logistic


def probe_accuracy(
    pos: Float[Tensor, "n_pos d"],
    neg: Float[Tensor, "n_neg d"],
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    l2: float = 1e-2,
) -> float:
    """Held-out accuracy of a logistic probe separating pos from neg (0.5 = chance).

    Each class is split at random into train and test parts with scikit-learn's
    ``train_test_split`` (so the split is stratified by class): ``round(n * test_fraction)`` of a
    class's ``n`` rows, but at least one and at most ``n - 1``, are held out. The draws come from
    one ``numpy`` ``RandomState(seed)``, so the split is reproducible. The probe
    (:func:`~sims_lens.steering.learners.probe.fit_logistic`, penalty ``l2``) is fitted on the train
    parts and scored on the test parts. Used to rank layers by how linearly separable H+ and H- are.
    """
    pos, neg = check_activations(pos, neg, learner="probe_accuracy")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"probe_accuracy: test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = np.random.RandomState(seed)
    splits = []
    for x in (pos, neg):
        n = x.shape[0]
        n_test = min(n - 1, max(1, round(n * test_fraction)))
        train, test = train_test_split(np.arange(n), test_size=n_test, random_state=rng, shuffle=True)
        splits.append((x[torch.from_numpy(train).to(x.device)], x[torch.from_numpy(test).to(x.device)]))
    (pos_train, pos_test), (neg_train, neg_test) = splits
    classifier = fit_logistic(pos_train, neg_train, l2=l2)
    with torch.no_grad():
        correct = (classifier.logits(pos_test) > 0).sum() + (classifier.logits(neg_test) <= 0).sum()
    return float(correct) / (pos_test.shape[0] + neg_test.shape[0])


def fisher_ratio(pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"]) -> float:
    """Fisher's criterion along the mean-difference direction ``u``.

    ``(mean(pos . u) - mean(neg . u))^2 / (var(pos . u) + var(neg . u))``: between-class over
    within-class variance of the 1-D projections. 0 when the means coincide, ``inf`` when the
    classes differ but have no spread along ``u``.
    """
    pos, neg = check_activations(pos, neg, learner="fisher_ratio")
    u = unit(mean_difference(pos.double(), neg.double()))
    if not bool(u.any()):
        return 0.0
    p, q = pos.double() @ u, neg.double() @ u
    between = float((p.mean() - q.mean()) ** 2)
    within = float(p.var(unbiased=False) + q.var(unbiased=False))
    if within <= 1e-300:
        return float("inf")
    return between / within
