"""The learner interface, the learner registry, and the input checks every learner shares.

A learner turns two activation sets at one hook point (``pos`` from preferred responses, ``neg``
from dispreferred ones) into a :class:`~sims_lens.steering.functions.SteeringFunction`. Learners
are small dataclasses whose fields are their settings, so a TOML table maps onto them directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.registry import Registry
from sims_lens.steering.functions import SteeringFunction

INPUTS = ("samples", "token_pairs")
"""The activation layouts a learner can ask for (its ``inputs``).

``"samples"``: one row per sample (its response tokens reduced by the run's ``reduction``);
``pos[i]`` and ``neg[i]`` come from the same prompt. ``"token_pairs"``: one row per response
token, position-paired: ``pos[i]`` and ``neg[i]`` are the same-position tokens of a paired ``y+``
and ``y-`` (HPR needs this).
"""


@runtime_checkable
class Learner(Protocol):
    """Fits one steering function at one hook point from positive and negative activations."""

    @property
    def name(self) -> str:
        """Registry name of the learner (``"mean_diff"``, ``"hpr"``, ...)."""
        ...

    @property
    def inputs(self) -> str:
        """One of :data:`INPUTS`: the activation layout ``fit`` expects."""
        ...

    def fit(
        self, pos: Float[Tensor, "n_pos d_model"], neg: Float[Tensor, "n_neg d_model"], hook: str
    ) -> SteeringFunction:
        """Learn the steering function for ``hook`` (pos: preferred, neg: dispreferred)."""
        ...


LEARNERS: Registry[Learner] = Registry("learner")
"""Registry: learner name -> class taking the learner's settings as keyword arguments."""

register_learner = LEARNERS.register


def make_learner(name: str, settings: Mapping[str, Any] | None = None, **more: Any) -> Learner:
    """Build the learner registered as ``name`` from a settings table and/or keyword settings.

    Raises ``ConfigError`` (a ``ValueError``) naming the unknown learner (and the known ones), or
    the unknown settings (and the allowed ones), instead of a bare ``TypeError``.
    """
    return LEARNERS.make(name, {**dict(settings or {}), **more})


def check_activations(
    pos: Tensor, neg: Tensor, *, paired: bool = False, learner: str = "learner"
) -> tuple[Float[Tensor, "n_pos d_model"], Float[Tensor, "n_neg d_model"]]:
    """Validate a learner's inputs and return them as float32 (same device).

    Both must be 2-D ``[n, d_model]`` with the same ``d_model``, at least 2 rows each and only
    finite values; ``paired`` learners also need as many positive as negative rows.
    """
    for label, x in (("pos", pos), ("neg", neg)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{learner}: {label} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{learner}: {label} must be 2-D [n, d_model], got shape {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(f"{learner}: {label} needs at least 2 rows (activations), got {x.shape[0]}")
        if not x.is_floating_point():
            raise TypeError(f"{learner}: {label} must be a real floating-point tensor, got {x.dtype}")
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{learner}: {label} contains {bad} non-finite (NaN or inf) value(s)")
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"{learner}: pos and neg differ in d_model: {pos.shape[1]} vs {neg.shape[1]}")
    if paired and pos.shape[0] != neg.shape[0]:
        raise ValueError(
            f"{learner}: needs paired rows (pos[i] with neg[i]), got {pos.shape[0]} pos and {neg.shape[0]} neg rows"
        )
    if pos.device != neg.device:
        raise ValueError(f"{learner}: pos is on {pos.device} but neg is on {neg.device}")
    return pos.float(), neg.float()


def unit(x: Float[Tensor, " d"], eps: float = 1e-12) -> Float[Tensor, " d"]:
    """``x / ||x||``, or zeros when ``x`` is (numerically) zero."""
    norm = x.norm()
    return x / norm if float(norm) > eps else torch.zeros_like(x)
