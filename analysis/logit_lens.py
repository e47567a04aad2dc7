"""The logit-lens reading of a steering direction: which tokens it promotes and suppresses.

``v`` is read as a residual-stream vector: optionally through the final norm, then the unembedding,
``logits = norm(v) @ W_U``. Biases are left out (``norm(v) - norm(0)``, no ``b_U``): a direction adds
to the residual stream, and a constant offset would rank the same tokens first for every direction.
With the norm (RMSNorm / LayerNorm) the values are those of a unit-scale residual along ``v``, so
they do not grow with the direction's norm; without it they scale linearly with ``v``.

The live analysis reads every observed layer's candidate direction this way after each iteration
and keeps the table in ``RUN/logit_lens.csv`` (:data:`LENS_COLUMNS`, :func:`lens_rows`,
:func:`replace_lens`, :func:`read_lens`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.files import write_atomic
from sims_lens.run_folder import RunFolder
from sims_lens.steering.functions import SteeringSet, layer_of

LENS_COLUMNS = ["iteration", "layer", "direction", "rank", "sign", "token", "logit"]
"""``RUN/logit_lens.csv``: per iteration, layer and direction (``candidate``: mean(H+) - mean(H-) of
the observed layer), the ``rank``-th (1 = strongest) token it ``promoted`` / ``suppressed`` and its logit."""
LENS_K = 5
"""Tokens per side the live analysis keeps."""


@dataclass
class LensReading:
    """Top-k promoted (highest logit) and suppressed (lowest logit) tokens, with their logits."""

    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]

    def to_frame(self) -> pd.DataFrame:
        """Tidy: ``side`` (promoted / suppressed), ``rank`` (0 = strongest), ``token``, ``value``."""
        rows = [
            {"side": side, "rank": rank, "token": token, "value": value}
            for side, pairs in (("promoted", self.promoted), ("suppressed", self.suppressed))
            for rank, (token, value) in enumerate(pairs)
        ]
        return pd.DataFrame(rows, columns=["side", "rank", "token", "value"])


@torch.no_grad()
def direction_logits(
    model: Any, direction: Float[Tensor, "*n d_model"], apply_ln: bool = True
) -> Float[Tensor, "*n d_vocab"]:
    """``norm(v) @ W_U`` without biases, in float32 (``model.W_U`` [d_model, d_vocab] or ``model.unembed``).

    Several directions (stacked in the leading dimensions) are read in one product: the unembedding
    is read from memory once, not once per direction.
    """
    param = next(model.parameters())
    batch = direction.shape[:-1]
    v = direction.detach().to(device=param.device, dtype=param.dtype).reshape(1, -1, direction.shape[-1])
    if apply_ln and getattr(model, "ln_final", None) is not None:
        v = model.ln_final(v) - model.ln_final(torch.zeros_like(v))
    w_u = getattr(model, "W_U", None)
    if isinstance(w_u, Tensor):
        logits = v[0].float() @ w_u.detach().float()
    else:
        unembed = model.unembed
        logits = (unembed(v) - unembed(torch.zeros_like(v)))[0].float()
    return logits.reshape(*batch, -1).cpu()


def logit_lens(
    model: Any,
    direction: Float[Tensor, " d_model"],
    k: int = 10,
    tokenizer: Any = None,
    apply_ln: bool = True,
) -> LensReading:
    """The ``k`` tokens ``direction`` promotes most and the ``k`` it suppresses most, as strings."""
    return _reading(direction_logits(model, direction, apply_ln), k, _tokenizer(model, tokenizer, k))


def _tokenizer(model: Any, tokenizer: Any, k: int) -> Any:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("logit_lens needs a tokenizer (pass tokenizer=, or use a model that carries one)")
    return tokenizer


def _reading(logits: Float[Tensor, " d_vocab"], k: int, tokenizer: Any) -> LensReading:
    k = min(k, logits.shape[0])
    top, bottom = logits.topk(k), (-logits).topk(k)
    return LensReading(
        promoted=[(_token(tokenizer, int(i)), float(v)) for v, i in zip(top.values, top.indices, strict=True)],
        suppressed=[(_token(tokenizer, int(i)), -float(v)) for v, i in zip(bottom.values, bottom.indices, strict=True)],
    )


def steering_lens(
    model: Any,
    steering: SteeringSet,
    k: int = 10,
    tokenizer: Any = None,
    apply_ln: bool = True,
    hooks: Iterable[str] | None = None,
) -> pd.DataFrame:
    """:func:`logit_lens` of every steered hook's direction, tidy: ``hook, layer, side, rank, token, value``."""
    frames = []
    for hook in hooks if hooks is not None else steering.functions:
        frame = logit_lens(model, steering.direction(hook), k, tokenizer, apply_ln).to_frame()
        frame.insert(0, "layer", layer_of(hook))
        frame.insert(0, "hook", hook)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["hook", "layer", "side", "rank", "token", "value"])
    return pd.concat(frames, ignore_index=True)


def lens_rows(
    model: Any,
    iteration: int,
    directions: Mapping[str, Tensor],
    *,
    k: int = LENS_K,
    tokenizer: Any = None,
    direction: str = "candidate",
    apply_ln: bool = True,
) -> pd.DataFrame:
    """:func:`logit_lens` of each hook's direction as rows of :data:`LENS_COLUMNS` (rank 1 = strongest)."""
    rows: list[dict[str, Any]] = []
    tokenizer = _tokenizer(model, tokenizer, k)
    if not directions:
        return _lens_frame(pd.DataFrame(rows, columns=LENS_COLUMNS))
    logits = direction_logits(model, torch.stack(list(directions.values())), apply_ln)  # one read of W_U
    for hook, row_logits in zip(directions, logits, strict=True):
        reading = _reading(row_logits, k, tokenizer)
        for sign, pairs in (("promoted", reading.promoted), ("suppressed", reading.suppressed)):
            rows += [
                {
                    "iteration": int(iteration),
                    "layer": layer_of(hook),
                    "direction": direction,
                    "rank": rank,
                    "sign": sign,
                    "token": token,
                    "logit": value,
                }
                for rank, (token, value) in enumerate(pairs, start=1)
            ]
    return _lens_frame(pd.DataFrame(rows, columns=LENS_COLUMNS))


def read_lens(run_dir: str | Path) -> pd.DataFrame:
    """``RUN/logit_lens.csv`` (:data:`LENS_COLUMNS`) without rows of unfinished iterations; empty if none.

    Tokens are read verbatim (an empty token, ``"nan"`` or ``"NA"`` stay strings).
    """
    folder = RunFolder(run_dir)
    frame = _read_lens_file(folder.logit_lens_path)
    if folder.state_path.is_file():
        frame = frame[frame["iteration"] <= folder.completed_iterations]
    return frame.reset_index(drop=True)


def replace_lens(run_dir: str | Path, frame: pd.DataFrame) -> Path:
    """Write ``frame``'s rows to ``RUN/logit_lens.csv``, replacing the rows of the iterations it holds."""
    folder = RunFolder(run_dir)
    folder.path.mkdir(parents=True, exist_ok=True)
    new = _lens_frame(frame)
    path = folder.logit_lens_path
    old = _read_lens_file(path)
    old = old[~old["iteration"].isin(set(new["iteration"]))]
    parts = [f for f in (old, new) if len(f)]
    out = pd.concat(parts, ignore_index=True) if parts else new
    order = {"promoted": 0, "suppressed": 1}
    out = out.sort_values(
        ["iteration", "layer", "direction", "sign", "rank"], key=lambda c: c.map(order) if c.name == "sign" else c
    )
    write_atomic(path, out.astype({"layer": "Int64"}).to_csv(index=False))
    return path


def _read_lens_file(path: Path) -> pd.DataFrame:
    if not path.is_file() or path.stat().st_size == 0:
        return _lens_frame(pd.DataFrame(columns=LENS_COLUMNS))
    text_columns = {"direction": str, "sign": str, "token": str}
    return _lens_frame(pd.read_csv(path, dtype=text_columns, keep_default_na=False))


def _lens_frame(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.reindex(columns=LENS_COLUMNS).copy()
    for column in ("iteration", "rank"):
        frame[column] = pd.to_numeric(frame[column]).astype("int64")
    frame["layer"] = pd.to_numeric(frame["layer"], errors="coerce").astype("float64")
    frame["logit"] = pd.to_numeric(frame["logit"], errors="coerce").astype("float64")
    for column in ("direction", "sign", "token"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), "").astype(str)
    return frame


def _token(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))
