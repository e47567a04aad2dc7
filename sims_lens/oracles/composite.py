"""A weighted sum of other oracles, with an optional length penalty.

    score = sum_c weight_c * normalise(score_c) - length_penalty * max(0, length - length_target)

``length`` counts words (whitespace-separated) or tokens (with the tokenizer handed to
:func:`~sims_lens.oracles.base.make_oracle`). The penalty keeps steering from buying reward with
longer answers. ``normalize`` puts the components on one scale before weighting: ``"none"`` (raw
scores), ``"zscore"`` (standardised within each prompt's candidates) or ``"rank"`` (within-prompt
rank scaled to [0, 1]; ties share their mean rank).

In TOML, each component's own settings are a nested table named after it::

    [oracles.composite]
    components = { lexicon_sentiment = 1.0, embedding_similarity = 0.5 }
    length_penalty = 0.01
    length_target = 60
    [oracles.composite.embedding_similarity]
    target = "A cheerful answer."
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sims_lens.oracles.base import (
    ORACLES,
    Oracle,
    check_inputs,
    is_relative,
    judges_with_policy,
    make_oracle,
    register_oracle,
)
from sims_lens.validation import check_choice, check_int, check_number, is_number, require

LENGTH_UNITS = ("word", "token")
NORMALIZATIONS = ("none", "zscore", "rank")


def _zscore(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [0.0] * len(values)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [0.0] * len(values) if std < 1e-12 else [(v - mean) / std for v in values]


def _rank(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [0.5] * len(values)
    ranks = []
    for v in values:
        below = sum(1 for w in values if w < v)
        equal = sum(1 for w in values if w == v)
        ranks.append((below + (equal - 1) / 2) / (len(values) - 1))
    return ranks


@register_oracle("composite")
@dataclass
class Composite:
    """Weighted sum of component oracles (``components``: oracle name -> weight) minus a length penalty.

    Settings: ``components``, ``component_settings`` (oracle name -> that oracle's settings; in a
    TOML table they may also be given as nested tables named after the component), ``normalize``,
    ``length_penalty`` (per unit of length over ``length_target``; 0 turns it off),
    ``length_target``, ``length_unit`` (``"word"`` or ``"token"``).
    """

    name: ClassVar[str] = "composite"
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    components: dict[str, float] = field(default_factory=lambda: {"lexicon_sentiment": 1.0})
    component_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    normalize: str = "none"
    length_penalty: float = 0.0
    length_target: int = 0
    length_unit: str = "word"
    oracles: dict[str, Oracle] = field(default_factory=dict, init=False, repr=False)

    @staticmethod
    def prepare_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
        """Move nested per-component tables (keys that are oracle names) into ``component_settings``."""
        out = dict(settings)
        nested = {k: out.pop(k) for k in list(out) if k in ORACLES and isinstance(out[k], Mapping)}
        if nested:
            merged = {k: dict(v) for k, v in dict(out.get("component_settings") or {}).items()}
            for key, value in nested.items():
                merged[key] = {**merged.get(key, {}), **dict(value)}
            out["component_settings"] = merged
        return out

    def __post_init__(self) -> None:
        if not isinstance(self.components, Mapping) or not self.components:
            raise ValueError(
                "composite: setting 'components' must be a non-empty table of oracle name -> weight, "
                f"e.g. {{lexicon_sentiment = 1.0}}; got {self.components!r}"
            )
        for key, weight in self.components.items():
            if key == "composite":
                raise ValueError("composite: a composite cannot contain another composite; list its components instead")
            if key not in ORACLES:
                raise ValueError(f"composite: unknown component oracle {key!r}; known oracles: {ORACLES.names()}")
            require(is_number(weight), f"{self.name}.components.{key}", weight, "a finite number")
        if not isinstance(self.component_settings, Mapping):
            raise ValueError(
                f"composite: setting 'component_settings' must be a table, got {self.component_settings!r}"
            )
        stray = sorted(set(self.component_settings) - set(self.components))
        if stray:
            raise ValueError(
                f"composite: settings given for {stray}, which are not among the components {sorted(self.components)}"
            )
        check_choice(self.name, "normalize", self.normalize, NORMALIZATIONS)
        check_number(self.name, 0.0, length_penalty=self.length_penalty)
        check_int(self.name, 0, length_target=self.length_target)
        check_choice(self.name, "length_unit", self.length_unit, LENGTH_UNITS)
        if self.length_penalty > 0 and self.length_unit == "token" and self.tokenizer is None:
            raise ValueError(
                "composite: length_unit 'token' needs the tokenizer: make_oracle('composite', settings, tokenizer=...)"
            )
        self.oracles = {
            key: make_oracle(key, self.component_settings.get(key), model=self.model, tokenizer=self.tokenizer)
            for key in self.components
        }

    @property
    def relative(self) -> bool:
        """Relative when any component is, or when scores are normalised within each prompt's group."""
        return self.normalize != "none" or any(is_relative(oracle) for oracle in self.oracles.values())

    @property
    def judges_with_policy(self) -> bool:
        """True when a component judges as the policy (a self-judge inside): then so does the composite."""
        return any(judges_with_policy(oracle) for oracle in self.oracles.values())

    def length(self, text: str) -> int:
        """The length of a response in the configured unit."""
        if self.length_unit == "token":
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return len(text.split())

    def penalty(self, text: str) -> float:
        """The length penalty of one response (0 up to ``length_target``)."""
        if self.length_penalty == 0:
            return 0.0
        return float(self.length_penalty) * max(0, self.length(text) - self.length_target)

    def component_scores(
        self, prompts: Sequence[str], responses: Sequence[Sequence[str]]
    ) -> dict[str, list[list[float]]]:
        """Each component oracle's raw scores."""
        check_inputs(prompts, responses, self.name)
        return {key: oracle.score(prompts, responses) for key, oracle in self.oracles.items()}

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        parts = self.component_scores(prompts, responses)
        norms: dict[str, Callable[[list[float]], list[float]]] = {"none": list, "zscore": _zscore, "rank": _rank}
        norm = norms[self.normalize]
        out: list[list[float]] = []
        for i, group in enumerate(responses):
            total = [-self.penalty(r) for r in group]
            for key, weight in self.components.items():
                values = norm([float(v) for v in parts[key][i]])
                total = [t + float(weight) * v for t, v in zip(total, values, strict=True)]
            out.append(total)
        return out
