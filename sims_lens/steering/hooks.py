"""Apply a :class:`SteeringSet` to a TransformerBridge as forward hooks on its hook points.

``with apply_steering(model, steering): ...`` adds the hooks and always removes them, also when
the body raises. ``attach(model, steering)`` adds permanent hooks and returns a handle whose
``detach()`` removes exactly those hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sims_lens.steering.names import layer_of
from sims_lens.steering.positions import current_tracker, position_mask, validate_policy

if TYPE_CHECKING:  # a type only: SteeringSet.apply calls this module
    from sims_lens.steering.functions import SteeringSet


def check_hooks(model: Any, hooks: list[str]) -> None:
    """Refuse hook names the model does not have, naming the valid range and form."""
    known = model.hook_dict
    for name in hooks:
        if name.endswith("hook_resid_mid"):
            raise ValueError(
                f"cannot steer at {name!r}: in TransformerLens 4.3's bridge hook_resid_mid is the MLP layer norm's "
                "input, so an edit there never reaches the residual stream; steer hook_attn_out or hook_resid_post"
            )
        if name in known:
            continue
        n_layers = int(model.cfg.n_layers)
        layer = layer_of(name)
        if layer is not None and not 0 <= layer < n_layers:
            raise ValueError(
                f"hook {name!r} names layer {layer}, but the model has {n_layers} layers (0-{n_layers - 1})"
            )
        suffix = name.split(".", 2)[-1] if layer is not None else name
        examples = sorted({n.split(".", 2)[-1] for n in known if n.startswith("blocks.0.hook_")})
        raise ValueError(
            f"unknown hook point {name!r} ({suffix!r} is not a hook of this model); "
            f"per-layer residual hooks are blocks.{{l}}.{{name}} with name one of {examples}"
        )


def make_hook_fn(
    steering: SteeringSet, name: str, model: Any, multiplier: float, positions: str
) -> Callable[..., Tensor]:
    """The TransformerLens hook function that edits the activations at hook point ``name``.

    The name is bound here, not read from the hook: the bridge reports a canonical name
    (``blocks.3.hook_out``) for aliases such as ``blocks.3.hook_resid_post``.
    """

    functions = steering.functions[name]
    if all(fn.edit == "add" for fn in functions):
        # the common case, kept cheap: one precomputed vector per hook
        total = multiplier * torch.stack([fn.multiplier * fn.params["vector"] for fn in functions]).sum(0)

        def edit(act: Tensor) -> Tensor:
            return act + total

    else:

        def edit(act: Tensor) -> Tensor:
            return steering(name, act, multiplier)

    def hook_fn(act: Tensor, hook: Any) -> Tensor:
        edited = edit(act)
        mask = position_mask(positions, act.shape[0], act.shape[1], current_tracker(model), act.device)
        if mask is None:
            return edited
        return edited.where(mask.unsqueeze(-1), act)

    return hook_fn


def _prepared(model: Any, steering: SteeringSet, positions: str | None) -> tuple[SteeringSet, str]:
    check_hooks(model, steering.hooks)
    policy = validate_policy(positions or steering.positions)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    return steering.to(device=device, dtype=dtype), policy


@contextmanager
def apply_steering(
    model: Any, steering: SteeringSet, *, multiplier: float = 1.0, positions: str | None = None
) -> Iterator[SteeringSet]:
    """Steer ``model`` inside the block; hooks are removed on exit, also after an exception."""
    prepared, policy = _prepared(model, steering, positions)
    hooks = [(name, make_hook_fn(prepared, name, model, multiplier, policy)) for name in prepared.hooks]
    with model.hooks(fwd_hooks=hooks):
        yield prepared


@dataclass
class SteeringHandle:
    """Permanent steering hooks on a model; ``detach()`` removes them (idempotent)."""

    model: Any
    handles: list[tuple[Any, Any]] = field(default_factory=list)

    def detach(self) -> None:
        for hook_point, handle in self.handles:
            handle.hook.remove()
            hook_point.fwd_hooks[:] = [h for h in hook_point.fwd_hooks if h is not handle]
        self.handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self.handles)


def attach(
    model: Any, steering: SteeringSet, *, multiplier: float = 1.0, positions: str | None = None
) -> SteeringHandle:
    """Register the steering hooks permanently (they survive ``reset_hooks()``); returns a handle."""
    prepared, policy = _prepared(model, steering, positions)
    handle = SteeringHandle(model)
    for name in prepared.hooks:
        point = model.hook_dict[name]
        hook_fn = make_hook_fn(prepared, name, model, multiplier, policy)
        handle.handles.append((point, point.add_hook(hook_fn, dir="fwd", is_permanent=True)))
    return handle


def active_hook_count(model: Any) -> int:
    """Number of forward hooks currently on the model's hook points (for tests and sanity checks)."""
    return sum(len(point.fwd_hooks) for point in model.hook_dict.values())
