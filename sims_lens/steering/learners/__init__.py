"""Steering-function learners: fit one steering function per hook from H+ and H- activations.

Registered names (:data:`LEARNERS`, :func:`make_learner`): ``mean_diff``, ``pca``, ``probe``,
``ablate_add``, ``hpr``. Importing this package registers all of them.
"""

from sims_lens.steering.learners.ablate_add import AblateAddLearner, negative_direction
from sims_lens.steering.learners.base import (
    INPUTS,
    LEARNERS,
    Learner,
    check_activations,
    make_learner,
    register_learner,
)
from sims_lens.steering.learners.hpr import HPRLearner
from sims_lens.steering.learners.mean_diff import MeanDiffLearner, mean_difference
from sims_lens.steering.learners.pca import PCALearner
from sims_lens.steering.learners.probe import ProbeLearner, fit_logistic

__all__ = [
    "INPUTS",
    "LEARNERS",
    "AblateAddLearner",
    "HPRLearner",
    "Learner",
    "MeanDiffLearner",
    "PCALearner",
    "ProbeLearner",
    "check_activations",
    "fit_logistic",
    "make_learner",
    "mean_difference",
    "negative_direction",
    "register_learner",
]
