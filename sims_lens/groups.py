"""Flat lists and per-prompt groups: the one place that splits and re-joins them.

The loop keeps a prompt's K responses next to each other (prompt-major), and oracles score
``responses[i][k]``: these helpers convert between the two shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive groups of ``size`` (prompt-major lists: K responses per prompt)."""
    if size < 1 or len(items) % size:
        raise ValueError(f"cannot split {len(items)} items into groups of {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def regroup(flat: Sequence[T], like: Sequence[Sequence[object]]) -> list[list[T]]:
    """``flat`` split into groups of the same sizes as ``like`` (a flattened result back to per-prompt)."""
    sizes = [len(group) for group in like]
    if sum(sizes) != len(flat):
        raise ValueError(f"cannot split {len(flat)} items into groups of sizes {sizes}")
    out, start = [], 0
    for size in sizes:
        out.append(list(flat[start : start + size]))
        start += size
    return out
