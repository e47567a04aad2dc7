"""A plain Python function as the oracle: ``f(prompts, responses) -> scores``, the shape of ``Oracle.score``.

``responses[i]`` holds the K responses to ``prompts[i]``; the function returns one list of K
numbers per prompt, higher meaning preferred. It says nothing of itself, so whether its scores
compare across prompts and iterations (absolute, the default) or only within one prompt's
responses (relative, as ranks are) is given when it is wrapped. Its output is checked on every
call, because a wrong shape would otherwise pair the wrong responses silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sims_lens.oracles.base import check_inputs

ScoreFn = Callable[[Sequence[str], Sequence[Sequence[str]]], Sequence[Sequence[float]]]
"""``f(prompts, responses) -> scores``: ``scores[i][k]`` rates ``responses[i][k]``, an answer to ``prompts[i]``."""


class OracleOutputError(ValueError):
    """An oracle returned scores of the wrong shape, or non-numbers."""


@dataclass(frozen=True)
class FunctionOracle:
    """An oracle made of a plain callable (see the module docstring)."""

    fn: ScoreFn
    relative: bool = False
    """True when the scores only rank the responses of one prompt (they mean nothing across prompts)."""
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"the oracle must be a callable f(prompts, responses) -> scores, got {type(self.fn)}")
        if not isinstance(self.relative, bool):
            raise TypeError(f"oracle_relative must be True or False, got {self.relative!r}")
        if not self.name:
            object.__setattr__(self, "name", function_name(self.fn))

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        check_inputs(prompts, responses, self.name)
        return checked_scores(self.fn(list(prompts), [list(group) for group in responses]), responses, self.name)


def function_name(fn: Any) -> str:
    """A readable name for a callable: its ``__name__`` (``"callable"`` for a lambda or a nameless object)."""
    name = str(getattr(fn, "__name__", "") or type(fn).__name__)
    return "callable" if name == "<lambda>" else name


def checked_scores(scores: Any, responses: Sequence[Sequence[str]], oracle: str) -> list[list[float]]:
    """``scores`` as lists of floats, one per response, or an :class:`OracleOutputError` naming what is off."""
    fix = "return one list of K numbers per prompt, scores[i][k] for responses[i][k]"
    try:
        rows = [list(row) for row in scores]
    except TypeError:
        raise OracleOutputError(
            f"oracle {oracle!r} returned {type(scores).__name__}, not lists of scores; {fix}"
        ) from None
    if len(rows) != len(responses):
        raise OracleOutputError(
            f"oracle {oracle!r} returned {len(rows)} score lists for {len(responses)} prompts; {fix}"
        )
    out: list[list[float]] = []
    for i, (row, group) in enumerate(zip(rows, responses, strict=True)):
        if len(row) != len(group):
            raise OracleOutputError(
                f"oracle {oracle!r} returned {len(row)} scores for prompt {i}'s {len(group)} responses; {fix}"
            )
        try:
            values = [float(v) for v in row]
        except (TypeError, ValueError):
            raise OracleOutputError(
                f"oracle {oracle!r} returned a non-number among prompt {i}'s scores; {fix}"
            ) from None
        if not all(math.isfinite(v) for v in values):
            raise OracleOutputError(f"oracle {oracle!r} returned NaN or inf among prompt {i}'s scores; {fix}")
        out.append(values)
    return out
