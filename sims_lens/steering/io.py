"""Save and load steering sets: safetensors for tensors, JSON for metadata. No pickle.

``save_steering(steering, path, model)`` writes ``path`` (``.safetensors``) with the metadata in the
safetensors header, plus a readable copy next to it (same name, ``.json``). ``load_steering`` checks
the metadata against a model (d_model, layer count, hook names) and refuses a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sims_lens.steering.functions import SteeringFunction, SteeringSet

FORMAT = "sims-lens-steering"
FORMAT_VERSION = 1


def steering_metadata(steering: SteeringSet, model: Any | None = None) -> dict[str, Any]:
    """The JSON metadata of a steering set (and of the model it was learned on, when given)."""
    functions = []
    for hook, fns in steering.functions.items():
        for index, fn in enumerate(fns):
            functions.append(
                {
                    "hook": hook,
                    "index": index,
                    "layer": fn.layer,
                    "edit": fn.edit,
                    "learner": fn.learner,
                    "multiplier": fn.multiplier,
                    "iteration": fn.iteration,
                    "d_model": fn.d_model,
                    "dtype": str(fn.direction.dtype).removeprefix("torch."),
                    "params": sorted(fn.params),
                    "extra": fn.extra,
                }
            )
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": steering.model_name,
        "positions": steering.positions,
        "iteration": steering.iteration,
        "functions": functions,
    }
    if model is not None:
        meta["model_name"] = steering.model_name or str(getattr(model.cfg, "model_name", ""))
        meta["d_model"] = int(model.cfg.d_model)
        meta["n_layers"] = int(model.cfg.n_layers)
    elif functions:
        meta["d_model"] = functions[0]["d_model"]
    return meta


def save_steering(steering: SteeringSet, path: str | Path, model: Any | None = None) -> Path:
    """Write ``steering`` to ``path`` (.safetensors) and its metadata to the sibling ``.json``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"steering files end in .safetensors, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = steering_metadata(steering, model)
    tensors = {
        f"{hook}/{index}/{name}": tensor.detach().contiguous().cpu()
        for hook, fns in steering.functions.items()
        for index, fn in enumerate(fns)
        for name, tensor in fn.params.items()
    }
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"sims_lens": json.dumps(meta)})
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored in a steering file's safetensors header."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"steering file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    if "sims_lens" not in header:
        raise ValueError(f"{path} has no sims-lens metadata; it was not written by save_steering")
    meta: dict[str, Any] = json.loads(header["sims_lens"])
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sims-lens steering file (format {meta.get('format')!r})")
    return meta


def check_compatible(meta: dict[str, Any], model: Any, source: str = "steering file") -> None:
    """Refuse steering learned for another model shape, naming what differs."""
    d_model, n_layers = int(model.cfg.d_model), int(model.cfg.n_layers)
    if meta.get("d_model") is not None and int(meta["d_model"]) != d_model:
        raise ValueError(
            f"{source} was learned on a model with d_model={meta['d_model']} "
            f"({meta.get('model_name') or 'unknown model'}), but this model has d_model={d_model}"
        )
    if meta.get("n_layers") is not None and int(meta["n_layers"]) != n_layers:
        raise ValueError(f"{source} was learned on a model with {meta['n_layers']} layers, this model has {n_layers}")
    missing = sorted({f["hook"] for f in meta["functions"]} - set(model.hook_dict))
    if missing:
        raise ValueError(f"{source} steers hook points this model does not have: {missing}")


def load_steering(path: str | Path, model: Any | None = None) -> SteeringSet:
    """Load a steering set; with ``model``, check that it fits that model first."""
    path = Path(path)
    meta = read_metadata(path)
    if model is not None:
        check_compatible(meta, model, source=str(path))
    tensors = load_file(str(path))
    functions = []
    for entry in meta["functions"]:
        prefix = f"{entry['hook']}/{entry['index']}/"
        params = {name: tensors[prefix + name] for name in entry["params"]}
        functions.append(
            SteeringFunction(
                edit=entry.get("edit", entry.get("kind")),  # "kind" in files written before 0.2
                hook=entry["hook"],
                params=params,
                multiplier=float(entry["multiplier"]),
                learner=entry.get("learner", ""),
                iteration=entry.get("iteration"),
                extra=dict(entry.get("extra") or {}),
            )
        )
    return SteeringSet.from_functions(
        functions,
        positions=meta.get("positions", "all"),
        model_name=meta.get("model_name", ""),
        iteration=meta.get("iteration"),
    )
