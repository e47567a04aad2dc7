"""Which token positions a steering hook may edit, under padding and the KV cache.

During generation with a KV cache, the prefill forward sees ``[batch, prompt, d_model]`` and each
decode step sees ``[batch, 1, d_model]``. :func:`track_positions` follows that (one hook on
``hook_embed`` counts the tokens each forward adds), so a hook can tell prompt tokens from
generated ones and real tokens from padding (left padding, or the sampler's padding between a
shared prefix and each prompt's rest). Outside :func:`track_positions` every forward
is taken to be a whole, unpadded sequence of prompt tokens.

Position policies:

- ``"all"``: every real token (never padding).
- ``"generated"``: the tokens that produce the response, i.e. the last real prompt token and every
  generated token. The last prompt token's output is the first response token's distribution, so
  steering it steers the first response token too (steering generated tokens alone would leave the
  first response token to the unsteered prefill). In the prefill forward of a generation the last
  real prompt token of each row is edited, in each cached decode step the new token, in an
  uncached re-run the last prompt token and all generated ones (the same edits, so cached and
  uncached greedy generation agree). In any other forward (a padded batch inside
  :func:`track_positions`, such as the self-judge's judging prompts, or an untracked forward) the
  last real token of each row is edited: the one whose output is read.
- ``"prompt"``: real prompt tokens only.
- ``"from:K"``: real tokens at position K and later, counted from each row's first real token.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

_FROM_RE = re.compile(r"^from:(\d+)$")
POLICIES = ("all", "generated", "prompt", "from:K")


def validate_policy(policy: str) -> str:
    """``policy`` if it names a position policy, else a ValueError listing them."""
    if policy in {"all", "generated", "prompt"} or _FROM_RE.match(policy):
        return policy
    raise ValueError(
        f"unknown position policy {policy!r}; use one of {', '.join(POLICIES)} "
        "(all: every real token; generated: the last prompt token and every generated token; "
        "prompt: real prompt tokens; from:K: real tokens from position K on, for example from:5)"
    )


@dataclass
class PositionTracker:
    """Where the current forward's tokens sit in the padded prompt-plus-generation sequence."""

    prompt_mask: Bool[Tensor, "batch prompt"]
    seen: int = 0
    offset: int = 0
    resume_at: int | None = None
    pad_counts: Int[Tensor, " batch"] = field(init=False)
    pads_through: Int[Tensor, "batch prompt"] = field(init=False)
    masks: dict[tuple[str, int, int], Tensor | None] = field(default_factory=dict)
    """Masks of the current forward by (policy, batch, seq_len): computed once, shared by every hook."""

    def __post_init__(self) -> None:
        self.set_rows(self.prompt_mask)

    @property
    def prompt_width(self) -> int:
        return int(self.prompt_mask.shape[1])

    def set_rows(self, prompt_mask: Bool[Tensor, "batch prompt"]) -> None:
        """The following forwards run rows with these prompt masks (padding anywhere in the prompt)."""
        self.prompt_mask = prompt_mask.to("cpu").bool()
        self.pads_through = (~self.prompt_mask).long().cumsum(-1)
        self.pad_counts = self.pads_through[:, -1]
        self.masks.clear()

    def select_rows(self, rows: Int[Tensor, " rows"]) -> None:
        """The following forwards run these rows of the batch, in this order (rows repeated or dropped)."""
        self.set_rows(self.prompt_mask[rows.cpu()])

    def resume(self, seen: int) -> None:
        """The next forward continues the sequence after its first ``seen`` tokens (a cached forward of any length)."""
        self.resume_at = seen

    def advance(self, seq_len: int) -> None:
        """Record one forward of ``seq_len`` tokens (prefill, cached step, continued prefill or full re-run)."""
        if self.resume_at is not None:
            self.offset, self.resume_at = self.resume_at, None
        else:
            self.offset = self.seen if (seq_len == 1 and self.seen > 0) else 0
        self.seen = self.offset + seq_len
        self.masks.clear()


_TRACKERS: dict[int, PositionTracker] = {}


def current_tracker(model: Any) -> PositionTracker | None:
    return _TRACKERS.get(id(model))


@contextmanager
def track_positions(model: Any, attention_mask: Int[Tensor, "batch prompt"]) -> Iterator[PositionTracker]:
    """Track token positions for the forwards inside (a generation, or a padded batch)."""
    tracker = PositionTracker(attention_mask.to("cpu"))

    def on_embed(act: Tensor, hook: Any) -> None:
        tracker.advance(int(act.shape[1]))

    previous = _TRACKERS.get(id(model))
    _TRACKERS[id(model)] = tracker
    try:
        with model.hooks(fwd_hooks=[("hook_embed", on_embed)]):
            yield tracker
    finally:
        if previous is None:
            _TRACKERS.pop(id(model), None)
        else:
            _TRACKERS[id(model)] = previous


def position_mask(
    policy: str, batch: int, seq_len: int, tracker: PositionTracker | None, device: torch.device
) -> Bool[Tensor, "batch pos"] | None:
    """Positions of the current forward that ``policy`` edits; None means all of them."""
    if tracker is None:
        return _untracked_mask(policy, batch, seq_len, device)
    key = (policy, batch, seq_len)
    if key not in tracker.masks:
        mask = _tracked_mask(policy, batch, seq_len, tracker)
        tracker.masks[key] = None if bool(mask.all()) else mask.to(device)
    return tracker.masks[key]


def _untracked_mask(policy: str, batch: int, seq_len: int, device: torch.device) -> Tensor | None:
    """A plain forward: one unpadded sequence of prompt tokens per row.

    Under ``"generated"`` the last position is edited: the last real token of each row (also under
    left padding, the one case where this policy needs no tracker to skip the padding). This also
    makes an untracked, cached, unpadded generation steer what a tracked one does (prefill: the last
    prompt token; decode steps: the new token); an untracked *uncached* one would steer only the
    newest token of each re-run, so generate under :func:`track_positions` (``generate_ids`` does).
    """
    if policy in {"all", "prompt"}:
        return None
    if policy == "generated":
        return (torch.arange(seq_len, device=device) == seq_len - 1).expand(batch, seq_len)
    start = int(policy.split(":")[1])
    index = torch.arange(seq_len, device=device)
    return (index >= start).expand(batch, seq_len)


def _tracked_mask(policy: str, batch: int, seq_len: int, tracker: PositionTracker) -> Tensor:
    width = tracker.prompt_width
    absolute = torch.arange(tracker.offset, tracker.offset + seq_len)
    in_prompt = absolute < width
    real = torch.ones(batch, seq_len, dtype=torch.bool)
    if bool(in_prompt.any()):
        real[:, in_prompt] = tracker.prompt_mask[:, absolute[in_prompt]]
    if policy == "all":
        mask = real
    elif policy == "generated":
        # the last prompt column (the last real prompt token of every row: prompts end there) and
        # every generated token; a row whose prompt is all padding has no real prompt token there
        mask = real & (absolute >= width - 1).expand(batch, seq_len)
    elif policy == "prompt":
        mask = real & in_prompt
    else:
        start = int(policy.split(":")[1])
        pads_before = tracker.pad_counts.unsqueeze(1).expand(batch, seq_len).clone()
        if bool(in_prompt.any()):
            pads_before[:, in_prompt] = tracker.pads_through[:, absolute[in_prompt]]
        row_position = absolute.unsqueeze(0) - pads_before
        mask = real & (row_position >= start)
    return mask
