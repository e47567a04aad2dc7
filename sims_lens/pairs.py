"""Contrast pairs given by the user: ``(prompt, chosen, rejected)`` triples, dicts, a JSONL/CSV file or ``hf:`` data.

This is the input of :func:`sims_lens.fitting.fit_pairs`, the "your own pairs" counterpart of a
SIMS iteration's D+ / D-: ``chosen`` plays y+ and ``rejected`` y-, both answers to ``prompt``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sims_lens.prompts import read_records

FIELDS = ("prompt", "chosen", "rejected")
EXAMPLE = '{"prompt": "...", "chosen": "...", "rejected": "..."}'
"""The fields of a pair, in a dict, a JSONL object or a CSV header."""


@dataclass(frozen=True)
class ContrastPair:
    """One user prompt (raw text), a preferred answer and a dispreferred one."""

    prompt: str
    chosen: str
    rejected: str


PairSource = str | os.PathLike[str] | Iterable[ContrastPair | tuple[str, str, str] | Mapping[str, Any]]


def load_pairs(source: PairSource) -> list[ContrastPair]:
    """Pairs from triples, dicts or :class:`ContrastPair` objects, a ``.jsonl``/``.csv`` file or ``hf:NAME[:SPLIT]``."""
    if isinstance(source, str | os.PathLike):
        records, where = read_records(source, what="pairs", example=EXAMPLE)
        pairs = [_from_item(record, f"{where}, row {i}") for i, record in enumerate(records, start=1)]
    else:
        where = "pairs"
        try:
            items = list(source)
        except TypeError:
            raise ValueError(
                f"pairs = {source!r}: use (prompt, chosen, rejected) triples, dicts with those fields, or a "
                ".jsonl/.csv file or 'hf:NAME' with those fields"
            ) from None
        pairs = [_from_item(item, f"pairs[{i}]") for i, item in enumerate(items)]
    if len(pairs) < 2:
        raise ValueError(f"{where} holds {len(pairs)} pair(s); a steering direction needs at least 2")
    return pairs


def _from_item(item: Any, where: str) -> ContrastPair:
    if isinstance(item, ContrastPair):
        values: list[Any] = [item.prompt, item.chosen, item.rejected]
    elif isinstance(item, Mapping):
        missing = [f for f in FIELDS if f not in item]
        if missing:
            raise ValueError(f"{where} lacks the field(s) {missing}; a pair needs {list(FIELDS)}, got {sorted(item)}")
        values = [item[f] for f in FIELDS]
    elif isinstance(item, tuple | list) and len(item) == 3:
        values = list(item)
    else:
        raise ValueError(f"{where} = {item!r} is not a pair; use a (prompt, chosen, rejected) triple or a dict")
    for name, value in zip(FIELDS, values, strict=True):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {name} must be non-empty text, got {value!r}")
    if values[1] == values[2]:
        raise ValueError(f"{where}: chosen and rejected are the same text; a pair must contrast two answers")
    return ContrastPair(*(str(v) for v in values))
