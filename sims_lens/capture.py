"""Capture activations of response tokens through hook points (ARCHITECTURE.md, "The method", step 5).

The base model is run on (prompt, response) token sequences in left-padded batches, with hooks that
record only the requested hook points; the forward ends after the deepest block they need (the
layers above and the unembedding never run). Only response tokens count: never the
prompt, never the padding, and (given ``end_ids``) never the end-of-turn token that closes a
finished response, so a finished and a truncated response are both captured over their content
tokens alone. Per sample they are reduced to their mean or last token, or kept per token (HPR pairs
positive and negative tokens position by position). Only the reduced float32 tensors are kept,
never the full cache.

:func:`capture_activations` also records, in the same forward pass, the per-sample mean over the
same tokens at further hook points (``mean_hooks``: the layers a run observes for analysis); those
are reduced inside the forward, so their token activations are never kept at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.batching import AUTO, BatchSize, exchange_batch_size, run_in_batches
from sims_lens.chat import Exchange, left_pad
from sims_lens.plain_twin import hooked_forward, packed_weights
from sims_lens.steering.functions import layer_of

REDUCTIONS = ("mean", "last")
"""How a sample's response tokens reduce to one row (the ``reduction`` setting)."""


def padded_forward_kwargs(mask: Tensor) -> dict[str, Tensor]:
    """Attention mask and matching position ids for a left-padded batch."""
    return {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def padded_batches(
    exchanges: Sequence[Exchange], pad_id: int, batch_size: int, device: torch.device
) -> Iterator[tuple[Sequence[Exchange], Tensor, dict[str, Tensor]]]:
    """Left-padded batches of (prompt + response) ids with their forward kwargs, on ``device``."""
    for start in range(0, len(exchanges), batch_size):
        chunk = exchanges[start : start + batch_size]
        ids, mask = left_pad([ex.ids for ex in chunk], pad_id)
        yield chunk, ids.to(device), {k: v.to(device) for k, v in padded_forward_kwargs(mask).items()}


def captured_length(response_ids: Sequence[int], end_ids: Collection[int]) -> int:
    """How many leading response tokens are captured: all but the trailing end tokens, at least one.

    The end-of-turn token is left out because only finished responses have one: keeping it would
    make the mean over tokens depend on whether the response was cut by ``max_new_tokens`` (a length
    confound), and make the ``last`` reduction read the end token for finished responses but a
    content token for truncated ones. A response that is *only* end tokens (an empty answer) keeps
    its first token: every sample must give at least one row (the reductions and the pairing of
    y+ with y- are per sample), and that token is where the model decided to answer nothing.
    """
    ends = {int(t) for t in end_ids}
    n = len(response_ids)
    while n > 0 and int(response_ids[n - 1]) in ends:
        n -= 1
    return max(n, min(1, len(response_ids)))


@dataclass(frozen=True, eq=False)
class Capture:
    """What one capture pass over samples kept (float32, on CPU)."""

    tokens: list[Float[Tensor, "n_tokens n_hooks d_model"]]
    """Per sample, its captured response tokens at ``hooks``."""
    means: Float[Tensor, "n_samples n_mean_hooks d_model"]
    """Per sample, the mean over the same response tokens at ``mean_hooks`` (``n_mean_hooks`` may be 0)."""


@torch.no_grad()
def capture_activations(
    model: Any,
    exchanges: Sequence[Exchange],
    hooks: Sequence[str],
    pad_id: int,
    batch_size: BatchSize = AUTO,
    on_batch: Callable[[int], None] | None = None,
    *,
    end_ids: Collection[int] = (),
    mean_hooks: Sequence[str] = (),
) -> Capture:
    """Per sample, its response tokens at ``hooks`` and their mean at ``mean_hooks``, in one forward pass.

    Both cover the same tokens (:func:`captured_length`: with ``end_ids`` the trailing end tokens are
    left out; the default keeps every token). ``hooks`` are cached for the batch and cut to the
    response tokens; a hook in ``mean_hooks`` only is reduced to per-sample means inside the forward,
    so no token activations are kept for it; a hook in both is captured once, and its mean is that
    of its captured tokens (equal to ``reduce_tokens(tokens, "mean")``).
    """
    hooks, mean_hooks = list(hooks), list(mean_hooks)
    if not hooks and not mean_hooks:
        raise ValueError("capture needs at least one hook point")
    for i, ex in enumerate(exchanges):
        if not ex.response_ids:
            raise ValueError(f"sample {i} has an empty response; there are no response tokens to capture")
    wanted = set(hooks)
    shared = [(k, hooks.index(h)) for k, h in enumerate(mean_hooks) if h in wanted]
    alone = [(k, h) for k, h in enumerate(mean_hooks) if h not in wanted]
    d_model = int(model.cfg.d_model)
    device = next(model.parameters()).device
    tokens: list[Tensor] = []
    means: list[Tensor] = []

    def run(first: int, last: int) -> None:
        [(chunk, ids, kwargs)] = padded_batches(exchanges[first:last], pad_id, last - first, device)
        width = ids.shape[1]
        spans = [(width - len(ex.response_ids), captured_length(ex.response_ids, end_ids)) for ex in chunk]
        reduced: dict[int, Tensor] = {}
        cache: dict[str, Tensor] = {}
        recorders = [(name, _span_means(spans, reduced, k)) for k, name in alone]
        recorders += [(name, _keep(cache, name)) for name in hooks]
        stop = _stop_after(model, [*hooks, *mean_hooks])
        with model.hooks(fwd_hooks=recorders + stop), hooked_forward(model) as lm, contextlib.suppress(_ForwardDone):
            lm(input_ids=ids, use_cache=False, **kwargs)  # the bridge's plain twin: the same hook points fire
        if hooks:
            stacked = torch.stack([cache[h] for h in hooks], dim=2)  # [batch, pos, n_hooks, d_model]
            chunk_tokens = [stacked[row, start : start + kept].float().cpu() for row, (start, kept) in enumerate(spans)]
            del stacked
        else:
            chunk_tokens = [torch.zeros(kept, 0, d_model) for _, kept in spans]
        del cache
        chunk_means = torch.zeros(len(chunk), len(mean_hooks), d_model)
        if shared:
            token_means = torch.stack([t.mean(0) for t in chunk_tokens])  # as reduce_tokens(..., "mean")
            for k, j in shared:
                chunk_means[:, k] = token_means[:, j]
        for k, name in alone:
            if k not in reduced:
                raise RuntimeError(f"hook point {name!r} did not fire in the forward pass; it cannot be observed")
            chunk_means[:, k] = reduced[k].cpu()
        tokens.extend(chunk_tokens)
        means.append(chunk_means)
        if on_batch is not None:
            on_batch(len(chunk))

    batch = exchange_batch_size(model, batch_size, "capture", exchanges, len(hooks) + len(mean_hooks))
    with packed_weights(model):
        run_in_batches(len(exchanges), batch, run, "capture")
    return Capture(tokens, torch.cat(means) if means else torch.zeros(0, len(mean_hooks), d_model))


def _span_means(spans: Sequence[tuple[int, int]], out: dict[int, Tensor], key: int) -> Callable[[Tensor, Any], None]:
    """A read-only forward hook storing, per row, the float32 mean of ``act[row, start : start + kept]``."""

    def hook_fn(act: Tensor, hook: Any) -> None:
        out[key] = torch.stack(
            [act[row, start : start + kept].float().mean(0) for row, (start, kept) in enumerate(spans)]
        )

    return hook_fn


class _ForwardDone(Exception):
    """Raised by the last hook a capture needs: the layers above it (and the unembedding) never run."""


def _keep(cache: dict[str, Tensor], name: str) -> Callable[[Tensor, Any], None]:
    def hook_fn(act: Tensor, hook: Any) -> None:
        cache[name] = act.detach()

    return hook_fn


def _stop_after(model: Any, names: Sequence[str]) -> list[tuple[str, Callable[[Tensor, Any], None]]]:
    """A hook on the output of the deepest block that ``names`` reach, ending the forward there.

    Only for per-layer hook points (``blocks.L.*``): every hook inside block L fires before its
    output. Anything else (the embedding, the final norm) keeps the whole forward.
    """
    layers = [layer_of(name) for name in names]
    if any(layer is None for layer in layers):
        return []
    deepest = f"blocks.{max(layer for layer in layers if layer is not None)}.hook_out"
    if deepest not in model.hook_dict:
        return []

    def stop(act: Tensor, hook: Any) -> None:
        raise _ForwardDone

    return [(deepest, stop)]


def capture_tokens(
    model: Any,
    exchanges: Sequence[Exchange],
    hooks: Sequence[str],
    pad_id: int,
    batch_size: BatchSize = AUTO,
    on_batch: Callable[[int], None] | None = None,
    *,
    end_ids: Collection[int] = (),
) -> list[Float[Tensor, "n_tokens n_hooks d_model"]]:
    """Per sample, the activations of its response tokens at every hook (float32, on CPU).

    With ``end_ids`` (the loop passes :func:`sims_lens.chat.end_token_ids`), the trailing end tokens
    of a response are not captured (see :func:`captured_length`); the default keeps every token.
    """
    if not hooks:
        raise ValueError("capture needs at least one hook point")
    return capture_activations(model, exchanges, hooks, pad_id, batch_size, on_batch, end_ids=end_ids).tokens


def reduce_tokens(
    per_sample: Sequence[Float[Tensor, "n_tokens n_hooks d_model"]], reduction: str
) -> Float[Tensor, "n_samples n_hooks d_model"]:
    """Mean or last response token of every sample."""
    if reduction == "mean":
        return torch.stack([t.mean(0) for t in per_sample])
    if reduction == "last":
        return torch.stack([t[-1] for t in per_sample])
    raise ValueError(f"unknown reduction {reduction!r}; use one of {list(REDUCTIONS)}")


def pair_tokens(
    pos: Sequence[Float[Tensor, "n_tokens n_hooks d_model"]],
    neg: Sequence[Float[Tensor, "n_tokens n_hooks d_model"]],
) -> tuple[Float[Tensor, "n_pairs n_hooks d_model"], Float[Tensor, "n_pairs n_hooks d_model"]]:
    """Position-paired tokens of paired responses: the i-th token of y+ with the i-th of y-."""
    if len(pos) != len(neg):
        raise ValueError(f"token pairing needs as many positive as negative samples ({len(pos)} vs {len(neg)})")
    lengths = [min(len(p), len(n)) for p, n in zip(pos, neg, strict=True)]
    return (
        torch.cat([p[:k] for p, k in zip(pos, lengths, strict=True)]),
        torch.cat([n[:k] for n, k in zip(neg, lengths, strict=True)]),
    )


def capture(
    model: Any,
    exchanges: Sequence[Exchange],
    hooks: Sequence[str],
    pad_id: int,
    reduction: str = "mean",
    batch_size: BatchSize = AUTO,
    *,
    end_ids: Collection[int] = (),
) -> Float[Tensor, "n_samples n_hooks d_model"]:
    """Reduced response-token activations, ``[n_samples, n_hooks, d_model]`` float32."""
    return reduce_tokens(capture_tokens(model, exchanges, hooks, pad_id, batch_size, end_ids=end_ids), reduction)
