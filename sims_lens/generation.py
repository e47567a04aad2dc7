"""Batched, KV-cached sampling with padding, under whatever steering hooks are active.

The current policy is the model plus the steering hooks attached around the call, so the same
function samples from pi_0 (no hooks) and pi_t (``with apply_steering(...)``). The decode loop
drives the bridge's plain Hugging Face twin (:mod:`sims_lens.plain_twin`: the same weights, the
hooks on the bridge's hook points still run) or, where the active hooks need it, the bridge's own
module, and does per batch only what the work needs (ARCHITECTURE.md, "Sampling"):

- prompts are sorted by length before batching (less padding) and the results returned in
  the caller's order;
- the leading tokens all prompts of a batch share (a chat template's system prompt) are prefilled
  once, for one row, and sit first in every row; each prompt's rest follows, left-padded;
- identical prompts in a batch (SIMS asks for K samples of each prompt) are prefilled once and
  their KV cache is shared by the K rows;
- the weight matrices are multiplied through oneDNN-prepacked copies on the CPU in float32
  (:mod:`sims_lens.packed_linear`);
- the prefill computes logits for the last position only;
- rows that have ended leave the batch (their KV cache rows are dropped) once enough have ended;
- every row draws its randomness from its own stream (``derive_seed(seed, "sample", index)``), one
  uniform per step, so a sampled response does not depend on the batch it ran in: batched equals
  one by one, cached equals uncached, for sampling as for greedy decoding.

A row stops at the first of *any* of its end tokens (:func:`sims_lens.chat.end_token_ids`: EOS,
the chat turn end and the others the tokenizer knows); the response runs up to and including it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sims_lens.batching import AUTO, BatchSize, check_batch_size, fitted_batch_size, run_in_batches
from sims_lens.chat import Exchange, encode_chat, end_token_ids, left_pad, split_generated
from sims_lens.kv_cache import growing_cache
from sims_lens.plain_twin import hooked_forward, packed_weights
from sims_lens.seeds import derive_seed
from sims_lens.steering.positions import track_positions


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample: ``temperature == 0`` means greedy decoding.

    ``batch_size``: rows per forward, or ``"auto"`` (:mod:`sims_lens.batching`). ``use_kv_cache``
    and ``packed_weights`` switch off fast paths (the tests compare them with the simple path).
    """

    max_new_tokens: int = 40
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: BatchSize = AUTO
    use_kv_cache: bool = True
    packed_weights: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        check_batch_size(self.batch_size)


@torch.inference_mode()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings = GenerationSettings(),
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Exchange]:
    """Generate one response per prompt (token ids in, exchanges out, in the prompts' order).

    Each row stops at the first token of :func:`~sims_lens.chat.end_token_ids` (all of them, not
    just EOS) or after ``max_new_tokens``. With ``seed`` the output is reproducible and the same
    for any ``batch_size``; without it sampling draws from torch's global generator.
    """
    if not prompts:
        return []
    eos = end_token_ids(tokenizer)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0))
    uniforms = row_uniforms(len(prompts), settings, seed)
    order = batch_order(prompts)
    responses: dict[int, list[int]] = {}

    def run(first: int, last: int) -> None:
        rows = order[first:last]
        batch_uniforms = None if uniforms is None else uniforms[rows]
        tokens = _generate_batch(model, [prompts[i] for i in rows], batch_uniforms, settings, eos, pad_id)
        for i, row_tokens in zip(rows, tokens, strict=True):
            responses[i] = row_tokens
        if on_batch is not None:
            on_batch(len(rows))

    longest = max(len(p) for p in prompts) + settings.max_new_tokens
    batch = fitted_batch_size(model, settings.batch_size, "generate", len(prompts), longest)
    with packed_weights(model, enabled=settings.packed_weights):
        run_in_batches(len(order), batch, run, "sampling")
    return [split_generated(list(p) + responses[i], len(p), [1] * len(p), eos) for i, p in enumerate(prompts)]


def precise_dtype(device: torch.device | str) -> torch.dtype:
    """float64 where ``device`` has it; float32 on Apple's MPS, which has no float64.

    For the few computations that want more than the model's precision on the model's device (the
    sampling distribution over the vocabulary): everywhere but MPS they stay in float64, as before.
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def row_uniforms(n_rows: int, settings: GenerationSettings, seed: int | None) -> Float[Tensor, "row step"] | None:
    """One uniform in [0, 1) per row and step (None under greedy decoding); row i's from its own seed.

    Drawn in float64 on the CPU whatever the model's device, so a seed gives the same draws everywhere
    (:func:`choose_tokens` casts them to :func:`precise_dtype` of its device)."""
    if settings.temperature == 0:
        return None
    if seed is None:
        return torch.rand(n_rows, settings.max_new_tokens, dtype=torch.float64)
    return torch.stack(
        [
            torch.rand(
                settings.max_new_tokens,
                generator=torch.Generator().manual_seed(derive_seed(seed, "sample", row)),
                dtype=torch.float64,
            )
            for row in range(n_rows)
        ]
    )


def batch_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Row indices by prompt length, identical prompts kept together (less padding, shared prefill)."""
    first: dict[tuple[int, ...], int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(tuple(p), i)
    return sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), first[tuple(prompts[i])], i))


def choose_tokens(
    logits: Float[Tensor, "batch vocab"], uniforms: Float[Tensor, " batch"] | None, settings: GenerationSettings
) -> Int[Tensor, " batch"]:
    """The next token of every row: argmax (greedy), else inverse-CDF sampling at temperature and top-p.

    Top-p keeps the most probable tokens up to and including the one whose cumulative probability
    reaches ``top_p`` (as Hugging Face does); the row's uniform picks among them in descending order
    (ties: the lower token id first). In a row whose tokens *more* probable than its
    ``NUCLEUS_CANDIDATES``-th most probable one hold ``top_p`` of its mass, the nucleus lies among
    them (a tie at the cut cannot reach into it), and only the candidates are sorted; the other rows
    sort their whole vocabulary: the same choice, without sorting 49k probabilities per row and step.
    """
    if uniforms is None:
        return logits.argmax(-1)
    precise = precise_dtype(logits.device)
    probs = torch.softmax(logits.to(precise) / settings.temperature, dim=-1)
    uniforms = uniforms.to(probs.device, precise)
    if settings.top_p >= 1:
        return _inverse_cdf(probs, uniforms, None)
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    top, index = probs.topk(k, dim=-1)
    above_cut = torch.where(top > top[:, -1:], top, 0.0).sum(-1)  # the mass strictly above the k-th candidate
    fits = above_cut >= settings.top_p if k < probs.shape[-1] else torch.zeros_like(uniforms, dtype=torch.bool)
    chosen = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    if bool(fits.any()):
        by_id = index[fits].argsort(dim=-1)  # candidates in token order, so that the stable sort breaks ties by id
        chosen[fits] = _nucleus(top[fits].gather(-1, by_id), index[fits].gather(-1, by_id), uniforms[fits], settings)
    if not bool(fits.all()):
        rest = probs[~fits]
        everything = torch.arange(rest.shape[-1], device=rest.device).expand_as(rest)
        chosen[~fits] = _nucleus(rest, everything, uniforms[~fits], settings)
    return chosen


def _nucleus(
    probs: Float[Tensor, "batch k"], index: Int[Tensor, "batch k"], uniforms: Float[Tensor, " batch"], settings: Any
) -> Int[Tensor, " batch"]:
    """Top-p over candidates ``index`` (in token-id order) with probabilities ``probs``, then inverse-CDF."""
    top, order = probs.sort(dim=-1, descending=True, stable=True)
    index = index.gather(-1, order)
    before = top.cumsum(-1) - top
    return _inverse_cdf(top.masked_fill(before >= settings.top_p, 0.0), uniforms, index)


NUCLEUS_CANDIDATES = 1024
"""How many of the most probable tokens :func:`choose_tokens` sorts first (all of them when these
do not hold ``top_p`` of the mass)."""


def _inverse_cdf(
    probs: Float[Tensor, "batch k"], uniforms: Float[Tensor, " batch"], index: Int[Tensor, "batch k"] | None
) -> Int[Tensor, " batch"]:
    """The token where each row's cumulative (unnormalised) probability first exceeds ``u`` x its total."""
    cumulative = probs.cumsum(-1)
    threshold = (uniforms.to(cumulative.device) * cumulative[:, -1]).unsqueeze(-1)
    position = torch.searchsorted(cumulative, threshold, right=True).clamp(max=probs.shape[-1] - 1)
    return (position if index is None else index.gather(-1, position)).squeeze(-1)


def _forward(
    lm: Any, ids: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch total"], cache: Any
) -> tuple[Float[Tensor, "batch vocab"], Any]:
    """Logits of each row's last position, and the KV cache (None when not caching)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
    out = lm(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=cache is not None,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float(), out.past_key_values if cache is not None else None


def _sliding(model: Any) -> bool:
    """Whether ``model`` has sliding-window attention: its window counts cache columns, so padding
    between a shared prefix and a row's rest would move the prefix out of it (plain left padding then)."""
    config = getattr(getattr(model, "original_model", model), "config", None)
    types = getattr(config, "layer_types", None) or []
    return bool(getattr(config, "sliding_window", None)) or any("sliding" in str(t) for t in types)


def _prefill(lm: Any, ids: Int[Tensor, "1 pos"], cache: Any) -> Any:
    """The KV cache after ``ids`` (one unpadded row), through the decoder alone: its logits are not needed."""
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    out = lm.base_model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
    return out.past_key_values


def _generate_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    uniforms: Float[Tensor, "batch step"] | None,
    settings: GenerationSettings,
    eos: list[int],
    pad_id: int,
) -> list[list[int]]:
    """Each row's generated tokens (up to ``max_new_tokens``; cut at the first end token later)."""
    device = next(model.parameters()).device
    unique: dict[tuple[int, ...], int] = {}
    expand = torch.tensor([unique.setdefault(tuple(p), len(unique)) for p in prompts])
    shared = shared_prefix_length(list(unique)) if settings.use_kv_cache and not _sliding(model) else 0
    ids, mask = prefix_first_pad(list(unique), shared, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    ends = torch.tensor(eos, dtype=torch.long, device=device)
    n_rows = len(prompts)
    out = torch.full((n_rows, settings.max_new_tokens), pad_id, dtype=torch.long)
    rows = expand.to(device)
    with track_positions(model, mask[:1] if shared else mask) as tracker, hooked_forward(model) as lm:
        reserve = settings.max_new_tokens + (ids.shape[1] - shared if shared else 0)  # room after the first fill
        cache: Any = growing_cache(lm.config, reserve) if settings.use_kv_cache else None
        if cache is not None:  # prefill the shared prefix once, then each distinct prompt's rest once
            if shared:
                cache = _prefill(lm, ids[:1, :shared], cache)
                cache.reorder_cache(torch.zeros(len(unique), dtype=torch.long, device=device))
                tracker.set_rows(mask)
                tracker.resume(shared)
            logits, cache = _forward(lm, ids[:, shared:], mask, cache)
            logits = logits[rows]
            if len(unique) < n_rows:
                cache.reorder_cache(rows)
        ids, mask = ids[rows], mask[rows]
        tracker.select_rows(expand)
        if cache is None:
            logits, _ = _forward(lm, ids, mask, None)
        active = torch.arange(n_rows)
        finished = torch.zeros(n_rows, dtype=torch.bool)
        for step in range(settings.max_new_tokens):
            step_uniforms = None if uniforms is None else uniforms[active, step]
            new = choose_tokens(logits, step_uniforms, settings)
            out[active, step] = new.cpu()
            finished[active] |= torch.isin(new, ends).cpu()
            if bool(finished.all()) or step == settings.max_new_tokens - 1:
                break
            keep = (~finished[active]).nonzero().squeeze(-1)
            if _worth_compacting(len(active) - len(keep), len(active)):
                active, new, ids, mask = active[keep], new[keep.to(device)], ids[keep.to(device)], mask[keep.to(device)]
                if cache is not None:
                    cache.reorder_cache(keep.to(device))
                tracker.select_rows(keep)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            if cache is not None:
                logits, cache = _forward(lm, new.unsqueeze(-1), mask, cache)
            else:
                ids = torch.cat([ids, new.unsqueeze(-1)], dim=1)
                logits, _ = _forward(lm, ids, mask, None)
    return [row.tolist() for row in out]


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``prompts`` share (0 for fewer than two), leaving each at least one of its own.

    Chat-formatted prompts share the template's opening (the embedded model's system prompt: 24
    tokens): :func:`_generate_batch` prefills it once for the whole batch.
    """
    if len(prompts) < 2:
        return 0
    first, shortest = prompts[0], min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def prefix_first_pad(
    prompts: Sequence[Sequence[int]], shared: int, pad_id: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """``(input_ids, attention_mask)`` with the ``shared`` leading tokens first, then each rest left-padded.

    So the shared prefix sits in the same columns of every row (its KV cache is computed once) and
    every row ends in its last prompt token; with ``shared == 0`` this is plain left padding.
    Position ids follow the mask, so a row's tokens get the positions they would have unpadded.
    """
    ids, mask = left_pad([p[shared:] for p in prompts], pad_id)
    if not shared:
        return ids, mask
    prefix = torch.tensor(list(prompts[0][:shared]), dtype=torch.long).expand(len(prompts), shared)
    return torch.cat([prefix, ids], dim=1), torch.cat([torch.ones_like(prefix), mask], dim=1)


def _worth_compacting(n_finished: int, n_active: int) -> bool:
    """Drop ended rows once they are a quarter of the batch: reindexing the cache costs about a step."""
    return n_finished > 0 and 4 * n_finished >= n_active


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    seed: int | None = None,
    system: str | None = None,
) -> list[str]:
    """Chat-format user prompts, generate, and return the decoded responses."""
    exchanges = generate_ids(model, tokenizer, [encode_chat(tokenizer, p, system) for p in prompts], settings, seed)
    return [decode_response(tokenizer, ex) for ex in exchanges]


def decode_response(tokenizer: Any, exchange: Exchange) -> str:
    return str(tokenizer.decode(list(exchange.response_ids), skip_special_tokens=True)).strip()
