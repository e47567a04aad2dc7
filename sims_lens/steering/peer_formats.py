"""A policy for other tools that steer Hugging Face modules: steering-vectors and lm-evaluation-harness.

Both add a vector to a module's output at every position, so both take what
:func:`~sims_lens.steering.gguf_vectors.additive_vectors` accepts. Hook points map onto the Hugging
Face model the bridge wraps (``model.original_model``):

| sims-lens hook          | module (Llama-like)     | steering-vectors ``layer_type`` |
| ---                     | ---                     | ---                             |
| blocks.k.hook_resid_post | ``layers.k``           | ``decoder_block``, layer k      |
| blocks.k.hook_resid_pre  | ``layers.{k-1}`` (k >= 1) | ``decoder_block``, layer k-1  |
| blocks.k.hook_attn_out   | ``layers.k.self_attn`` | ``self_attn``, layer k          |
| blocks.k.hook_mlp_out    | ``layers.k.mlp``       | ``mlp``, layer k                |

lm-evaluation-harness (``--model steered --model_args pretrained=...,steer_path=FILE.pt``) reads a
``.pt`` dict ``{hookpoint: {steering_vector, steering_coefficient, action, bias, head_index}}`` and
resolves each hookpoint among ``model.base_model.named_modules()`` (``lm_eval/models/hf_steered.py``)
of the model it loads itself, so names are the plain Hugging Face model's, never the bridge's
(which wraps every block in place). steering-vectors likewise patches a plain Hugging Face model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sims_lens.steering.gguf_vectors import FormatError, additive_vectors
from sims_lens.steering.names import layer_of

if TYPE_CHECKING:
    from sims_lens.steering.functions import SteeringSet

ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")
MLP_NAMES = ("mlp", "feed_forward")
LAYER_TYPES = {
    "hook_resid_post": "decoder_block",
    "hook_resid_pre": "decoder_block",
    "hook_attn_out": "self_attn",
    "hook_mlp_out": "mlp",
}
HOOK_OF_LAYER_TYPE = {"decoder_block": "hook_resid_post", "self_attn": "hook_attn_out", "mlp": "hook_mlp_out"}


def hf_module(model: Any) -> Any:
    """The Hugging Face model a TransformerBridge wraps (or the model itself)."""
    return getattr(model, "original_model", model)


def model_type(model: Any) -> str:
    """The Hugging Face ``model_type`` (``llama``, ``qwen2``, ...), or "" for a model without a config."""
    return str(getattr(getattr(hf_module(model), "config", None), "model_type", "") or "")


def module_target(hook: str) -> tuple[int, str]:
    """(layer, kind) of the Hugging Face module whose output is ``hook``: kind is a steering-vectors layer type."""
    layer, point = layer_of(hook), hook.rsplit(".", 1)[-1]
    if layer is None or point not in LAYER_TYPES:
        raise FormatError(
            f"{hook} is not a block's hook point that a Hugging Face module outputs ({sorted(LAYER_TYPES)})"
        )
    if point == "hook_resid_pre":
        if layer == 0:
            raise FormatError(
                "blocks.0.hook_resid_pre is the embeddings' output (scaled inside the model on some architectures), "
                "not a decoder block's; steer hook_resid_post of a layer instead"
            )
        return layer - 1, "decoder_block"
    return layer, LAYER_TYPES[point]


def to_lm_eval(steering: SteeringSet, path: str | os.PathLike[str], model: Any) -> Path:
    """Write the ``.pt`` file lm-evaluation-harness's ``steered`` model reads (only tensors, floats and strings)."""
    path = Path(path)
    if path.suffix not in (".pt", ".pth"):
        raise FormatError(f"lm-eval's steered model reads .pt or .pth files, got {path.name!r}")
    names = _module_names(model)
    config: dict[str, dict[str, Any]] = {}
    for hook, vector in additive_vectors(steering, "lm-eval's steered model").items():
        name = names[module_target(hook)]
        if name in config:  # resid_post k and resid_pre k+1 are one module's output: lm-eval keys by module
            config[name]["steering_vector"] = config[name]["steering_vector"] + vector
            continue
        config[name] = {
            "steering_vector": vector,
            "steering_coefficient": 1.0,
            "action": "add",
            "bias": None,
            "head_index": None,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(config, path)
    return path


def to_steering_vector(steering: SteeringSet, model: Any) -> Any:
    """A steering-vectors ``SteeringVector`` (one layer type per vector, so one kind of hook point per set)."""
    from steering_vectors import SteeringVector

    decoder = _decoder_layers(model)
    layers: dict[int, Tensor] = {}
    kinds = set()
    for hook, vector in additive_vectors(steering, "a steering-vectors SteeringVector").items():
        layer, kind = module_target(hook)
        if layer >= len(decoder):
            raise FormatError(f"{hook}: the Hugging Face model has {len(decoder)} decoder layers, not {layer + 1}")
        kinds.add(kind)
        layers[layer] = layers[layer] + vector if layer in layers else vector
    if len(kinds) > 1:
        raise FormatError(
            f"a SteeringVector has one layer type, but this policy steers {sorted(kinds)}; "
            "export the hooks of one kind at a time"
        )
    return SteeringVector(layer_activations=dict(sorted(layers.items())), layer_type=kinds.pop())


def from_steering_vector(vector: Any, model: Any) -> dict[str, Tensor]:
    """A ``SteeringVector``'s vectors by sims-lens hook (its layer numbers checked against the model)."""
    kind = getattr(vector, "layer_type", "decoder_block")
    if kind not in HOOK_OF_LAYER_TYPE:
        raise FormatError(
            f"SteeringVector layer_type {kind!r} has no sims-lens hook; use one of {list(HOOK_OF_LAYER_TYPE)}"
        )
    n_layers, d_model = len(_decoder_layers(model)), int(model.cfg.d_model)
    out = {}
    for layer, activation in sorted(vector.layer_activations.items()):
        if not 0 <= int(layer) < n_layers:
            raise FormatError(f"SteeringVector layer {layer} is outside this model's {n_layers} decoder layers")
        if activation.dim() != 1 or activation.numel() != d_model:
            raise FormatError(
                f"SteeringVector layer {layer} has shape {list(activation.shape)}; this model needs [{d_model}]"
            )
        out[f"blocks.{int(layer)}.{HOOK_OF_LAYER_TYPE[kind]}"] = activation.detach().float().cpu()
    return out


def _decoder_layers(model: Any) -> Any:
    """The ModuleList of the decoder blocks: the first in the base model with as many blocks as the model has
    layers (a vision tower's list, in a multimodal model, has another length or comes later)."""
    hf, n_layers = hf_module(model), int(model.cfg.n_layers)
    lists = [m for _, m in hf.base_model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if not lists:
        raise FormatError(f"cannot find the {n_layers} decoder blocks of {type(hf).__name__} in its base model")
    return lists[0]


def _module_names(model: Any) -> dict[tuple[int, str], str]:
    """(layer, kind) -> the module name lm-eval resolves, among ``base_model.named_modules()``."""
    hf, decoder = hf_module(model), _decoder_layers(model)
    prefix = next(name for name, m in hf.base_model.named_modules() if m is decoder)
    names = {}
    for index, block in enumerate(decoder):
        names[(index, "decoder_block")] = f"{prefix}.{index}"
        plain = getattr(block, "_original_component", block)  # a bridge wraps each block; the hub model does not
        children = dict(plain.named_children())
        for kind, candidates in (("self_attn", ATTENTION_NAMES), ("mlp", MLP_NAMES)):
            child = next((c for c in candidates if c in children), None)
            if child is not None:
                names[(index, kind)] = f"{prefix}.{index}.{child}"
    return _Names(names)


class _Names(dict[tuple[int, str], str]):
    def __missing__(self, key: tuple[int, str]) -> str:
        raise FormatError(f"this model has no {key[1]} module in decoder layer {key[0]}")
