"""Hook-point names: which layer a ``blocks.{l}.*`` name belongs to."""

from __future__ import annotations

import re

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def layer_of(hook_name: str) -> int | None:
    """Layer index of a ``blocks.{l}.*`` hook name, None for hooks outside the blocks."""
    match = _LAYER_RE.match(hook_name)
    return int(match.group(1)) if match else None
