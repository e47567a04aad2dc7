"""Householder pseudo-rotation (HPR) learner: a bias-free probe plus an angle-predicting MLP.

Pham and Nguyen, "Householder Pseudo-Rotation: A Novel Approach to Activation Editing in LLMs
with Direction-Magnitude Perspective" (EMNLP 2024); reference code VinAIResearch/HPR. The edit
itself (rotate probe-negative activations toward their reflection, norm kept) lives in
``sims_lens.steering.functions``; this module only learns its parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.steering.functions import SteeringFunction, householder_angles, hpr_angle, hpr_probe_logit
from sims_lens.steering.learners.base import check_activations, register_learner
from sims_lens.steering.learners.probe import logistic_weights
from sims_lens.validation import check_int, check_number, is_number, require


@dataclass(frozen=True)
class _Normaliser:
    """Input normalisation used only during training, folded into the returned parameters.

    The probe has no bias (its hyperplane must pass through the origin for the reflection), so
    its input may only be rescaled: by one global ``scale`` (the activations' RMS entry), which keeps
    the reflection geometry isotropic. The MLP has biases, so its input is standardised per
    dimension (``(h - mu) / sigma``), folded exactly into ``mlp_w1`` and ``mlp_b1``.
    """

    scale: Float[Tensor, ""]
    mu: Float[Tensor, " d"]
    sigma: Float[Tensor, " d"]

    @classmethod
    def of(cls, x: Float[Tensor, "n d"]) -> _Normaliser:
        sigma = x.std(dim=0, unbiased=False)
        floor = 1e-6 * float(sigma.max().clamp_min(1e-30))
        return cls(
            scale=x.pow(2).mean().sqrt().clamp_min(1e-30),
            mu=x.mean(dim=0),
            sigma=torch.where(sigma > floor, sigma, torch.ones_like(sigma)),
        )

    def for_probe(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        return x / self.scale

    def for_mlp(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        return (x - self.mu) / self.sigma

    def to_raw(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Parameters acting on normalised inputs -> the same functions of raw activations."""
        p = {k: v.detach().double() for k, v in params.items()}
        sigma, mu = self.sigma.double(), self.mu.double()
        raw = {
            "probe": p["probe"] / self.scale.double(),
            "mlp_w1": p["mlp_w1"] / sigma.unsqueeze(-1),
            "mlp_b1": p["mlp_b1"] - (mu / sigma) @ p["mlp_w1"],
            "mlp_w2": p["mlp_w2"],
            "mlp_b2": p["mlp_b2"],
        }
        return {k: v.float() for k, v in raw.items()}


def _init_mlp(d: int, hidden: int, generator: torch.Generator) -> dict[str, Tensor]:
    """The angle MLP's layers, drawn like ``torch.nn.Linear`` (uniform, bound 1/sqrt(fan_in))."""

    def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound

    return {
        "mlp_w1": uniform((d, hidden), d),
        "mlp_b1": uniform((hidden,), d),
        "mlp_w2": uniform((hidden, 1), hidden),
        "mlp_b2": uniform((1,), hidden),
    }


@register_learner("hpr")
@dataclass
class HPRLearner:
    """Learn HPR's probe ``w`` and angle MLP from position-paired positive and negative tokens.

    Objective, as in the reference ``householder_loss``: ``BCE(sigmoid(w . h), label)`` over ``h+``
    (label 1) and ``h-`` (label 0), plus ``angle_loss_weight`` times the MSE of
    ``theta = pi * sigmoid(MLP(h))`` against ``angle(h-_i, h+_i)`` for negatives and 0 for positives,
    averaged over both. The two terms share no parameters (BCE depends only on ``w``, the MSE only on
    the MLP), so minimising the sum is minimising each, and each gets the optimiser that suits it:

    - probe: bias-free logistic regression, full-batch LBFGS with a small L2 (``probe_l2``), on
      activations divided by one global scale. Mini-batch Adam from zero (the reference's choice)
      first moves every coordinate by the same step, ``w ~ sign(mean(h+) - mean(h-))``; on synthetic
      clusters that left the normal at cosine ~0.8 to the true separating direction and the
      reflection far from the positive cluster, where LBFGS reached > 0.99.
    - MLP: Adam (``lr``) over ``epochs`` of shuffled mini-batches of ``batch_size`` pairs, inputs
      standardised per dimension. The weight only rescales the MLP's gradient, which Adam largely
      normalises away; ``0`` leaves the MLP at its initialisation.

    Deterministic given ``seed`` (MLP initialisation and shuffling use one seeded generator; the
    probe fit draws nothing). Normalisations are folded back (see :class:`_Normaliser`), so the
    returned parameters act on raw activations, as ``functions._edit_hpr`` expects.
    """

    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 256
    hidden: int = 64
    angle_loss_weight: float = 1.0
    probe_l2: float = 1e-3
    max_reach: float = 1.0
    """How far a rotation may go, as a fraction of the way to the reflection: 1 never rotates past
    the reflection (the edit then only flips the component along the probe's normal), 0.5 stops on
    the hyperplane, ``inf`` is the reference's unbounded angle."""
    gate_probability: float = 0.5
    """Rotate only activations whose probe probability of "preferred" is below this (the reference: 0.5)."""
    seed: int = 0

    name: ClassVar[str] = "hpr"
    inputs: ClassVar[str] = "token_pairs"
    positions: ClassVar[str] = "generated"
    """The reference edits only the token being generated; ``positions = "auto"`` resolves to this."""

    def __post_init__(self) -> None:
        check_int(self.name, 1, epochs=self.epochs, batch_size=self.batch_size, hidden=self.hidden)
        check_int(self.name, 0, seed=self.seed)
        check_number(self.name, 0.0, above=True, lr=self.lr, probe_l2=self.probe_l2)
        check_number(self.name, 0.0, angle_loss_weight=self.angle_loss_weight)
        reach = self.max_reach
        require(
            reach == math.inf or (is_number(reach) and reach > 0),
            f"{self.name}.max_reach",
            reach,
            "a number > 0 (or inf: no cap)",
        )
        require(
            is_number(self.gate_probability) and 0 < self.gate_probability <= 0.5,
            f"{self.name}.gate_probability",
            self.gate_probability,
            "a number in (0, 0.5] (rotate activations the probe puts on the dispreferred side)",
        )

    def fit(self, pos: Float[Tensor, "n d"], neg: Float[Tensor, "n d"], hook: str) -> SteeringFunction:
        pos, neg = check_activations(pos, neg, paired=True, learner=self.name)
        n, d = pos.shape
        device = pos.device
        both = torch.cat([pos, neg])
        norm = _Normaliser.of(both)
        labels = torch.cat([torch.ones(n, device=device), torch.zeros(n, device=device)])
        probe, _ = logistic_weights(norm.for_probe(both), labels, l2=self.probe_l2, bias=False)

        target = householder_angles(neg, pos)  # angle(h-_i, h+_i), the rotation that reaches h+_i
        targets = torch.cat([torch.zeros_like(target), target])
        mlp_in = norm.for_mlp(both)
        generator = torch.Generator().manual_seed(self.seed)
        mlp = {k: v.to(device).requires_grad_() for k, v in _init_mlp(d, self.hidden, generator).items()}
        optimizer = torch.optim.Adam(list(mlp.values()), lr=self.lr)
        batch = min(self.batch_size, n)
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=generator).to(device)
            for start in range(0, n, batch):
                pairs = order[start : start + batch]
                rows = torch.cat([pairs, pairs + n])  # h+_i and its paired h-_i
                loss = self.angle_loss_weight * _angle_mse(mlp, mlp_in[rows], targets[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        params = norm.to_raw({"probe": probe, **mlp})
        params["max_reach"] = torch.tensor(self.max_reach, dtype=torch.float32)
        params["gate_logit"] = torch.tensor(math.log(self.gate_probability / (1 - self.gate_probability)))
        with torch.no_grad():
            logits = hpr_probe_logit(both, params)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            accuracy = ((logits > 0).float() == labels).float().mean()
            angle_mse = _angle_mse(params, both, targets)
        return SteeringFunction(
            edit="hpr",
            hook=hook,
            params=params,
            learner=self.name,
            extra={
                "n_pairs": n,
                "train_probe_accuracy": float(accuracy),
                "train_bce": float(bce),
                "train_angle_mse": float(angle_mse),
                "mean_target_angle": float(target.mean()),
                "epochs": self.epochs,
                "seed": self.seed,
            },
        )


def _angle_mse(mlp: Mapping[str, Tensor], x: Float[Tensor, "b d"], targets: Float[Tensor, " b"]) -> Tensor:
    """MSE between HPR's predicted angle ``pi * sigmoid(MLP(x))`` and ``targets``."""
    return torch.nn.functional.mse_loss(hpr_angle(x, mlp), targets)
