"""Steering functions: pure tensor edits plus their parameters and metadata.

A :class:`SteeringFunction` edits the activations of one hook point (one layer). Its ``edit``
names a pure function in :data:`EDITS`; its ``params`` hold the tensors that function needs.
Every edit is written as ``h + multiplier * delta(h)`` (or a rotation whose angle is scaled
by the multiplier), so multiplier 0 is always the identity. A :class:`SteeringSet` (one function
per steered hook point) is what a SIMS policy is.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sims_lens.steering.hooks import apply_steering
from sims_lens.steering.names import layer_of

__all__ = ["DIRECTION_PARAM", "EDITS", "SteeringFunction", "SteeringSet", "layer_of"]

Edit = Callable[[Float[Tensor, "... d_model"], Mapping[str, Tensor], float], Float[Tensor, "... d_model"]]
"""A pure edit: (activations, params, multiplier) -> edited activations of the same shape."""


def _edit_add(h: Tensor, params: Mapping[str, Tensor], multiplier: float) -> Tensor:
    """CAA / ActAdd: ``h + m * v``."""
    return h + multiplier * params["vector"].to(h.dtype)


def _edit_ablate_add(h: Tensor, params: Mapping[str, Tensor], multiplier: float) -> Tensor:
    """Repel then attract: project out the unit direction ``u`` and add ``v``, scaled by ``m``.

    ``h' = h + m * (v - (h . u) u)``: at m = 1 the ``u`` component is removed exactly.
    """
    u = params["ablate"].to(h.dtype)
    v = params["vector"].to(h.dtype)
    projection = (h @ u).unsqueeze(-1) * u
    return h + multiplier * (v - projection)


def householder_angles(h: Float[Tensor, "... d"], h_ref: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
    """Angle between each activation and its Householder reflection (or any paired vectors).

    Kahan's ``2 atan2(|a - b|, |a + b|)`` on the unit vectors: unlike ``arccos`` of the cosine it
    keeps its accuracy for small angles in float32.
    """
    a = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    b = h_ref / h_ref.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return 2.0 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))


def hpr_angle(h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """HPR's predicted rotation angle in (0, pi): ``pi * sigmoid(MLP(h))``."""
    hidden = torch.relu(h @ params["mlp_w1"].to(h.dtype) + params["mlp_b1"].to(h.dtype))
    logit = hidden @ params["mlp_w2"].to(h.dtype) + params["mlp_b2"].to(h.dtype)
    return math.pi * torch.sigmoid(logit.squeeze(-1))


def hpr_probe_logit(h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """HPR's probe logit ``w . h`` (no bias); positive means "preferred"."""
    return h @ params["probe"].to(h.dtype)


def _edit_hpr(h: Tensor, params: Mapping[str, Tensor], multiplier: float) -> Tensor:
    """Householder pseudo-rotation (Pham and Nguyen, 2024), norm-preserving.

    Activations the probe classifies as negative are rotated by ``g1 = m * theta(h)`` in the
    plane of ``h`` and its reflection ``h_ref = H h``; others pass unchanged. Two optional
    parameters (absent: the reference's behaviour) bound the edit: ``max_reach`` caps ``g1`` at that
    fraction of ``g2`` (1: never past the reflection, which flips only the component along the
    probe's normal; 0.5: stop on the hyperplane), and ``gate_logit`` rotates only activations whose
    probe logit is below it (at most 0; the reference gates at 0, probability 0.5).

    The rotation ``(sin g1 h_ref + sin(g2 - g1) h) / sin g2`` (``g2`` the angle between ``h`` and
    ``h_ref``) is evaluated in the equal form ``cos g1 h + sin g1 ||h|| n``, where ``n`` is the unit
    vector orthogonal to ``h`` in that plane, on the probe's positive side. The first form divides
    by ``sin g2 -> 0`` near the hyperplane and, in float32, changed the norm of a few percent of
    activations by up to ~10%; the second keeps the norm to rounding.
    """
    compute = h.float()
    apply, g1, n = _hpr_plan(compute, params, multiplier)
    h_norm = compute.norm(dim=-1, keepdim=True)
    rotated = torch.cos(g1).unsqueeze(-1) * compute + torch.sin(g1).unsqueeze(-1) * h_norm * n
    return torch.where(apply.unsqueeze(-1), rotated, compute).to(h.dtype)


def hpr_rotation(
    h: Float[Tensor, "... d"], params: Mapping[str, Tensor], multiplier: float = 1.0
) -> tuple[Bool[Tensor, "..."], Float[Tensor, "..."]]:
    """What the HPR edit does to each activation: whether it rotates it, and by what angle (radians)."""
    apply, g1, _ = _hpr_plan(h.float(), params, multiplier)
    return apply, torch.where(apply, g1, torch.zeros_like(g1))


def _hpr_plan(compute: Tensor, params: Mapping[str, Tensor], multiplier: float) -> tuple[Tensor, Tensor, Tensor]:
    """The gate, the angle ``g1`` and the unit direction ``n`` of the rotation of each activation."""
    w_unit = params["probe"].float()
    w_unit = w_unit / w_unit.norm()
    h_unit = compute / compute.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    cosine = h_unit @ w_unit
    toward = w_unit - cosine.unsqueeze(-1) * h_unit
    toward_norm = toward.norm(dim=-1)
    n = toward / toward_norm.unsqueeze(-1).clamp_min(1e-30)
    g1 = multiplier * hpr_angle(compute, {k: v.float() for k, v in params.items()})
    if "max_reach" in params:  # g2 = angle(h, Hh) = 2 asin(|cos(h, w)|)
        g2 = 2.0 * torch.asin(cosine.abs().clamp(max=1.0))
        g1 = torch.minimum(g1, params["max_reach"].float() * g2)
    gate = params["gate_logit"].float().clamp(max=0.0) if "gate_logit" in params else 0.0
    negative = (compute @ params["probe"].float()) < gate
    safe = toward_norm > 1e-6  # h antiparallel to w: the plane is undefined
    return negative & safe, g1, n


EDITS: dict[str, Edit] = {"add": _edit_add, "ablate_add": _edit_ablate_add, "hpr": _edit_hpr}
"""Registry of edits by name. A new edit registers its pure function here."""

DIRECTION_PARAM: dict[str, str] = {"add": "vector", "ablate_add": "vector", "hpr": "probe"}
"""Which parameter is each edit's "steering direction" for geometry (cosines, logit lens)."""


@dataclass
class SteeringFunction:
    """One learned edit at one hook point, with the metadata needed to save, load and compare it."""

    edit: str
    hook: str
    params: dict[str, Tensor]
    multiplier: float = 1.0
    learner: str = ""
    iteration: int | None = None
    extra: dict[str, float | int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.edit not in EDITS:
            raise ValueError(f"unknown steering edit {self.edit!r}; known edits: {sorted(EDITS)}")
        missing = {DIRECTION_PARAM[self.edit]} - set(self.params)
        if missing:
            raise ValueError(f"steering edit {self.edit!r} needs parameters {sorted(missing)}")

    @property
    def layer(self) -> int | None:
        return layer_of(self.hook)

    @property
    def d_model(self) -> int:
        return int(self.direction.shape[-1])

    @property
    def direction(self) -> Float[Tensor, " d_model"]:
        """The function's steering direction (the added vector, or HPR's probe normal)."""
        return self.params[DIRECTION_PARAM[self.edit]]

    def __call__(self, h: Float[Tensor, "... d_model"], multiplier: float = 1.0) -> Float[Tensor, "... d_model"]:
        return EDITS[self.edit](h, self.params, self.multiplier * multiplier)

    def scaled(self, factor: float) -> SteeringFunction:
        return dataclasses.replace(self, multiplier=self.multiplier * factor)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SteeringFunction:
        params = {k: v.to(device=device, dtype=dtype) for k, v in self.params.items()}
        return dataclasses.replace(self, params=params)


@dataclass
class SteeringSet:
    """The steering functions of one policy: hook name -> functions applied in order.

    Most sets hold one function per hook. Adding two sets sums additive vectors at shared hooks
    (the exact sum of two ``add`` edits) and chains any other edits.
    """

    functions: dict[str, list[SteeringFunction]] = field(default_factory=dict)
    positions: str = "all"
    model_name: str = ""
    iteration: int | None = None

    @classmethod
    def from_functions(cls, functions: Iterable[SteeringFunction], **kwargs: object) -> SteeringSet:
        out: dict[str, list[SteeringFunction]] = {}
        for fn in functions:
            out.setdefault(fn.hook, []).append(fn)
        return cls(functions=out, **kwargs)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[SteeringFunction]:
        for fns in self.functions.values():
            yield from fns

    def __len__(self) -> int:
        return sum(len(f) for f in self.functions.values())

    @property
    def hooks(self) -> list[str]:
        return list(self.functions)

    @property
    def layers(self) -> list[int]:
        return sorted({lay for h in self.functions if (lay := layer_of(h)) is not None})

    def __call__(self, hook: str, h: Tensor, multiplier: float = 1.0) -> Tensor:
        for fn in self.functions.get(hook, []):
            h = fn(h, multiplier)
        return h

    def direction(self, hook: str) -> Float[Tensor, " d_model"]:
        """The summed effective direction at ``hook`` (multipliers folded in)."""
        fns = self.functions[hook]
        return torch.stack([fn.multiplier * fn.direction.float() for fn in fns]).sum(0)

    def scaled(self, factor: float) -> SteeringSet:
        return dataclasses.replace(
            self, functions={h: [f.scaled(factor) for f in fns] for h, fns in self.functions.items()}
        )

    def apply(
        self, model: Any, *, multiplier: float = 1.0, positions: str | None = None
    ) -> AbstractContextManager[SteeringSet]:
        """Steer ``model`` inside a ``with`` block; the hooks are removed on exit, also after an exception.

        ``with steering.apply(model): ...`` is :func:`sims_lens.steering.hooks.apply_steering`.
        """
        return apply_steering(model, self, multiplier=multiplier, positions=positions)

    def __mul__(self, factor: float) -> SteeringSet:
        return self.scaled(factor)

    __rmul__ = __mul__

    def __add__(self, other: SteeringSet) -> SteeringSet:
        merged: dict[str, list[SteeringFunction]] = {h: list(f) for h, f in self.functions.items()}
        for hook, fns in other.functions.items():
            merged[hook] = _merge_chain(merged.get(hook, []) + list(fns))
        return dataclasses.replace(self, functions=merged)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SteeringSet:
        return dataclasses.replace(
            self, functions={h: [f.to(device, dtype) for f in fns] for h, fns in self.functions.items()}
        )

    def cosine_similarity(self, other: SteeringSet) -> dict[str, float]:
        """Cosine similarity of the effective directions at every hook both sets steer."""
        return {
            hook: float(torch.nn.functional.cosine_similarity(self.direction(hook), other.direction(hook), dim=0))
            for hook in self.functions
            if hook in other.functions
        }

    # -- other tools' formats (docs/interop.md) --------------------------------------------------
    def to_gguf(self, path: str | os.PathLike[str], model: Any) -> Path:
        """Write a llama.cpp control vector (:mod:`sims_lens.steering.gguf_vectors`); ``model``: the one it steers."""
        from sims_lens.steering.gguf_vectors import write_control_vector
        from sims_lens.steering.peer_formats import model_type

        return write_control_vector(self, path, model_type(model))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], model: Any) -> SteeringSet:
        """A llama.cpp control vector (repeng's, cvector-generator's, ours) as ``add`` edits at ``hook_resid_post``."""
        import warnings

        from sims_lens.steering.gguf_vectors import read_control_vector
        from sims_lens.steering.peer_formats import model_type

        vectors, hint = read_control_vector(path, int(model.cfg.d_model), int(model.cfg.n_layers))
        if hint and model_type(model) and hint != model_type(model):
            warnings.warn(f"{path} was made for a {hint!r} model; this model is {model_type(model)!r}", stacklevel=2)
        return cls._added(vectors, learner="gguf", source=Path(path).name, hint=hint)

    def to_lm_eval(self, path: str | os.PathLike[str], model: Any) -> Path:
        """Write the ``.pt`` file lm-evaluation-harness's ``steered`` model reads (``peer_formats``)."""
        from sims_lens.steering.peer_formats import to_lm_eval

        return to_lm_eval(self, path, model)

    def to_steering_vector(self, model: Any) -> Any:
        """This set as a steering-vectors ``SteeringVector`` for ``model``'s Hugging Face module."""
        from sims_lens.steering.peer_formats import to_steering_vector

        return to_steering_vector(self, model)

    @classmethod
    def from_steering_vector(cls, vector: Any, model: Any) -> SteeringSet:
        """A steering-vectors ``SteeringVector`` as ``add`` edits (its layer numbers checked against ``model``)."""
        from sims_lens.steering.peer_formats import from_steering_vector

        return cls._added(from_steering_vector(vector, model), learner="steering_vectors", source="SteeringVector")

    @classmethod
    def _added(cls, vectors: dict[str, Tensor], learner: str, source: str, hint: str = "") -> SteeringSet:
        extra: dict[str, float | int | str] = {"source": source, **({"model_hint": hint} if hint else {})}
        functions = [
            SteeringFunction("add", hook, {"vector": v}, learner=learner, extra=dict(extra))
            for hook, v in vectors.items()
        ]
        return cls.from_functions(functions, positions="all")

    def norms(self) -> dict[str, float]:
        return {hook: float(self.direction(hook).norm()) for hook in self.functions}

    def norm_matched(self, reference: SteeringSet) -> SteeringSet:
        """This set rescaled, hook by hook, to ``reference``'s norm there: its direction at another's length.

        Separates what a direction does from how long it is. Only additive edits have a length to
        match (a rotation's multiplier scales an angle): ValueError for any other, or for hooks the
        two sets do not share.
        """
        if set(self.functions) != set(reference.functions):
            raise ValueError(
                f"norm matching needs the same hooks; got {sorted(self.functions)} and {sorted(reference.functions)}"
            )
        other = [fn.edit for fn in [*self, *reference] if fn.edit not in ("add", "ablate_add")]
        if other:
            raise ValueError(f"norm matching rescales added vectors; the {other[0]!r} edit has no length to match")
        mine, target = self.norms(), reference.norms()
        factors = {h: target[h] / mine[h] if mine[h] > 0 else 0.0 for h in self.functions}
        return dataclasses.replace(
            self, functions={h: [f.scaled(factors[h]) for f in fns] for h, fns in self.functions.items()}
        )


def _merge_chain(fns: list[SteeringFunction]) -> list[SteeringFunction]:
    """Fold consecutive ``add`` edits into one (their sum is exact); keep others in order."""
    out: list[SteeringFunction] = []
    for fn in fns:
        if out and out[-1].edit == "add" and fn.edit == "add":
            prev = out[-1]
            vector = prev.multiplier * prev.params["vector"] + fn.multiplier * fn.params["vector"].to(
                prev.params["vector"].dtype
            )
            out[-1] = dataclasses.replace(prev, params={"vector": vector}, multiplier=1.0)
        else:
            out.append(fn)
    return out
