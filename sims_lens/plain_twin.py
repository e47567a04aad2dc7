"""A plain Hugging Face twin of a TransformerBridge's model, sharing its weights, for fast sampling.

Booting a TransformerBridge wraps every Hugging Face submodule in a component with hook points,
and every forward pays for that wrapping at every layer, hooked or not (measured on the embedded
model, batch 16, one decode step: 154 ms through the bridge against 104-123 ms for the plain model).
The twin is the same architecture built without the bridge, whose parameters and buffers *are*
the bridge's tensors (nothing is copied; an in-place change of a weight shows in both).

Hooks stay TransformerLens hooks. Every bridge component's ``hook_in`` and ``hook_out`` (so
``blocks.L.hook_resid_pre`` / ``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``,
``hook_embed``, ``unembed.hook_out`` and the rest of that kind) has a twin site: the input or the
first output of the Hugging Face module the component wraps. :func:`hooked_forward` registers, for
each of those hook points that has hooks, a torch hook on the twin's module that calls the bridge's
``HookPoint`` (so its hooks run and may edit the tensor). A hook anywhere else (``hook_q``,
``hook_pattern``, a norm's ``hook_scale``) has no twin site: then :func:`hooked_forward` yields the
bridge's own module and nothing changes. A twin is checked once when built: its logits and every
twin site's activation must equal the bridge's on a short input, else it is not used
(ARCHITECTURE.md, "Sampling").
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sims_lens.packed_linear import packed_linears

_WRAPPED = "._original_component"
_ATTRIBUTE = "_sims_lens_twin"
"""Where a bridge keeps its built twin (None: not usable) and the verdict: in its ``__dict__``, so
the twin lives and dies with the bridge and is not registered as a submodule."""


Site = tuple[str, Any, str]
"""Where a hook point runs in the twin: (module path, the bridge's ``HookPoint``, "in" or "out")."""


class Twin:
    """A plain twin and the sites of the hook points it was checked to honour (by ``id`` of the ``HookPoint``)."""

    def __init__(self, module: nn.Module, sites: dict[int, Site]) -> None:
        self.module = module
        self.sites = sites


@dataclass(frozen=True)
class TwinVerdict:
    """Whether the twin is used and why: the largest logit difference against the bridge, and the tolerance."""

    used: bool
    reason: str
    largest_difference: float | None = None
    tolerance: float | None = None


def plain_twin(model: Any) -> Twin | None:
    """The checked plain twin of ``model`` (built on first use), or None where there is none."""
    cached = model.__dict__.get(_ATTRIBUTE)
    if cached is not None:
        return cached[0]
    twin, verdict = _build_checked(model)
    model.__dict__[_ATTRIBUTE] = (twin, verdict)
    return twin


def twin_verdict(model: Any) -> TwinVerdict:
    """Whether sampling, capture and NLL run through ``model``'s plain twin, and why (builds it if needed)."""
    if getattr(model, "original_model", None) is None:
        return TwinVerdict(False, "not a TransformerBridge: its own module runs")
    plain_twin(model)
    return model.__dict__[_ATTRIBUTE][1]


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol as a fraction of the largest |value|)`` for the twin's check in ``dtype``.

    The twin runs SDPA attention where the bridge runs eager attention, so the two round differently.
    In float32 that is ~1e-6 relative and the check is tight (1e-3, 1e-4). In bfloat16 and float16 each
    layer rounds at the dtype's epsilon, and the logits of 30 layers differ by several epsilons of
    their scale (embedded model, bfloat16, a text input: 1.05 at logits up to ~30, 4.5 epsilons); a
    twin that is *wrong* (a missing norm, another rotary base) differs by the logits' own scale. So
    half precision allows 16 epsilons of the largest value.
    """
    eps = float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0
    if eps <= float(torch.finfo(torch.float32).eps):
        return 1e-3, 1e-4
    return 0.0, 16 * eps


@contextmanager
def hooked_forward(model: Any) -> Iterator[nn.Module]:
    """The module to run ``model``'s forwards with: the twin, with the hooks active now, or the bridge's.

    The hooks on ``model``'s hook points must not change inside the block; the twin's own torch
    hooks are removed on exit, also after an error.
    """
    bridged = getattr(model, "original_model", None)
    if bridged is None:  # a plain module already
        yield model
        return
    twin = plain_twin(model)
    hooked = hooked_points(model)
    if twin is None or any(id(point) not in twin.sites for point in hooked):
        yield bridged
        return
    sites = [twin.sites[id(point)] for point in hooked]
    handles = [_register(twin.module.get_submodule(path), point, side) for path, point, side in sites]
    try:
        yield twin.module
    finally:
        for handle in handles:
            handle.remove()


def forward_modules(model: Any) -> list[nn.Module]:
    """The modules :func:`hooked_forward` may run for ``model``: its twin (where there is one) and the bridged model."""
    bridged = getattr(model, "original_model", None)
    if bridged is None:
        return [model]
    twin = plain_twin(model)
    return [bridged] if twin is None else [twin.module, bridged]


def packed_weights(model: Any, enabled: bool = True) -> AbstractContextManager[int]:
    """Within the block, ``model``'s forwards (twin or bridge) multiply by prepacked weights
    (:func:`sims_lens.packed_linear.packed_linears`; float32 on the CPU)."""
    return packed_linears(*forward_modules(model), enabled=enabled)


def _site_map(model: Any) -> dict[int, Site]:
    """``id(HookPoint)`` -> its :data:`Site`, for every bridge component's hook_in and hook_out."""
    paths = {id(module): path for path, module in model.original_model.named_modules()}
    sites: dict[int, Site] = {}
    for component in model.modules():
        path = paths.get(id(component))
        if path is None or not hasattr(component, "original_component"):
            continue
        twin_path = path.replace(_WRAPPED, "")
        for side in ("in", "out"):
            point = getattr(component, f"hook_{side}", None)
            if point is not None:
                sites[id(point)] = (twin_path, point, side)
    return sites


def hooked_points(model: Any) -> list[Any]:
    """Every hook point of ``model`` that has hooks now (each once, aliases included)."""
    points = {id(p): p for p in model.hook_dict.values()}.values()
    return [p for p in points if p._forward_hooks or p._forward_pre_hooks or p._backward_hooks]


def _register(module: nn.Module, point: Any, side: str) -> Any:
    if side == "in":

        def before(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            if args and isinstance(args[0], Tensor):
                return (point(args[0]), *args[1:]), kwargs
            key = (
                "hidden_states"
                if "hidden_states" in kwargs
                else next(k for k, v in kwargs.items() if isinstance(v, Tensor))
            )
            return args, {**kwargs, key: point(kwargs[key])}

        return module.register_forward_pre_hook(before, with_kwargs=True)

    def after(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, Tensor):
            return point(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (point(output[0]), *output[1:])
        if hasattr(output, "logits"):  # a ModelOutput
            output.logits = point(output.logits)
            return output
        raise TypeError(f"cannot run hook point {point.name!r} on an output of type {type(output).__name__}")

    return module.register_forward_hook(after)


def _build(model: Any) -> nn.Module:
    """The bridge's Hugging Face architecture without the bridge, on the bridge's own tensors."""
    bridged = model.original_model
    config = copy.deepcopy(bridged.config)
    if getattr(type(bridged), "_supports_sdpa", False):
        # the bridge switches attention to "eager" for its hook_pattern; the twin has no such hook
        config._attn_implementation = "sdpa"
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = type(bridged)(config)
    tensors = {name.replace(_WRAPPED, ""): t for name, t in bridged.state_dict(keep_vars=True).items()}
    tensors |= {name.replace(_WRAPPED, ""): t for name, t in bridged.named_buffers()}
    for name, _ in [*twin.named_parameters(remove_duplicate=False), *twin.named_buffers(remove_duplicate=False)]:
        if name not in tensors:
            raise KeyError(f"the bridge has no tensor for the twin's {name}")
        owner, _, leaf = name.rpartition(".")
        module = twin.get_submodule(owner)
        if leaf in module._parameters:
            value = tensors[name]
            module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, False)
        else:
            module._buffers[leaf] = tensors[name]
    return twin.eval()


def _build_checked(model: Any) -> tuple[Twin | None, TwinVerdict]:
    """Build the twin and check it against the bridge; None (with a warning) where either fails."""
    try:
        module = _build(model)
        sites, difference, allowed = _verified_sites(model, module)
        if sites is not None:
            return Twin(module, sites), TwinVerdict(True, "its logits match the bridge's", difference, allowed)
        reason = f"its logits differ from the bridge's by up to {difference:.3g} (tolerance {allowed:.3g})"
        verdict = TwinVerdict(False, reason, difference, allowed)
    except Exception as err:  # an architecture the twin cannot be built for
        reason = f"{type(err).__name__}: {err}"
        verdict = TwinVerdict(False, reason)
    warnings.warn(f"sampling runs through the TransformerBridge (slower): no plain twin ({reason})", stacklevel=3)
    return None, verdict


CHECK_TEXT = "The quick brown fox jumps over the lazy dog, and then it rests."
"""The input of the twin's check: ordinary text (special tokens alone blow up in half precision)."""


def _check_ids(model: Any, device: torch.device) -> Tensor:
    """:data:`CHECK_TEXT`'s tokens where the bridge has a tokenizer, else ordinary ids from mid-vocabulary."""
    tokenizer = getattr(model, "tokenizer", None)
    vocab = int(model.cfg.d_vocab)
    ids: list[int] = []
    if tokenizer is not None:
        ids = [int(t) for t in tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"] if 0 <= int(t) < vocab]
    if len(ids) < 4:
        ids = [(vocab // 2 + 7 * i) % vocab for i in range(12)]
    return torch.tensor(ids, device=device).unsqueeze(0)


@torch.no_grad()
def _verified_sites(model: Any, twin: nn.Module) -> tuple[dict[int, Site] | None, float, float]:
    """The twin sites whose activation equals the bridge's on a short input (None if the logits differ),
    the largest logit difference and the difference allowed."""
    parameter = next(model.original_model.parameters())
    ids = _check_ids(model, parameter.device)
    rtol, atol = tolerance(parameter.dtype)
    sites = {key: site for key, site in _site_map(model).items() if site[1].name is not None}
    seen: dict[str, dict[int, Any]] = {"bridge": {}, "twin": {}}
    side = ["bridge"]

    def recorder(key: int) -> Any:
        def record(act: Any, hook: Any) -> None:
            seen[side[0]].setdefault(key, act.detach().float().clone() if isinstance(act, Tensor) else None)

        return record

    with (
        _suspended(model),
        model.hooks(fwd_hooks=[(point.name, recorder(key)) for key, (_, point, _) in sites.items()]),
    ):
        bridge_logits = model.original_model(input_ids=ids).logits.float()
        side[0] = "twin"
        handles = [_register(twin.get_submodule(path), point, kind) for path, point, kind in sites.values()]
        try:
            twin_logits = twin(input_ids=ids).logits.float()
        finally:
            for handle in handles:
                handle.remove()
    gap = (bridge_logits - twin_logits).abs()
    worst = int(gap.argmax())
    difference = float(gap.reshape(-1)[worst])
    # what allclose allows at that element
    allowed = atol * float(bridge_logits.abs().max()) + rtol * float(twin_logits.abs().reshape(-1)[worst])
    if not _close(bridge_logits, twin_logits, rtol, atol):
        return None, difference, allowed
    kept = {
        key: site for key, site in sites.items() if _close(seen["bridge"].get(key), seen["twin"].get(key), rtol, atol)
    }
    return kept, difference, allowed


@contextmanager
def _suspended(model: Any) -> Iterator[None]:
    """The hooks already on ``model``'s hook points (steering, position tracking) set aside, then put back."""
    points = list({id(p): p for p in model.hook_dict.values()}.values())
    kept = [(p, p._forward_hooks, p._forward_pre_hooks) for p in points]
    try:
        for p in points:
            p._forward_hooks, p._forward_pre_hooks = OrderedDict(), OrderedDict()
        yield
    finally:
        for p, hooks, pre_hooks in kept:
            p._forward_hooks, p._forward_pre_hooks = hooks, pre_hooks


def _close(a: Tensor | None, b: Tensor | None, rtol: float, atol: float) -> bool:
    """``a`` and ``b`` agree within ``rtol`` and ``atol`` x the largest ``|a|``."""
    if a is None or b is None or a.shape != b.shape:
        return False
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol * float(a.abs().max().clamp_min(1e-6))))
