"""The preference-oracle interface, the oracle registry, and oracle agreement.

An oracle scores the K candidate responses of each prompt; a higher score means a preferred
response. Only the order within a prompt matters to SIMS (it picks D+ and D- from it), so scores
of different oracles need not share a scale. Oracles are small dataclasses whose fields are their
settings (a TOML table maps onto them); the fields ``model`` and ``tokenizer`` are not settings
but the language model an oracle may use (the self-judge), passed by :func:`make_oracle`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

RESOURCES = ("model", "tokenizer")
"""Constructor arguments that are handed over by :func:`make_oracle`, not user settings."""


@runtime_checkable
class Oracle(Protocol):
    """Scores candidate responses: one list of scores per prompt, one score per response."""

    @property
    def name(self) -> str:
        """Registry name of the oracle (``"lexicon_sentiment"``, ``"self_judge"``, ...)."""
        ...

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        """Score ``responses[i][k]``, the k-th candidate answer to the raw user prompt ``prompts[i]``.

        Returns ``scores[i][k]``; higher means preferred. Prompts are raw user text, not chat-formatted.
        """
        ...


ORACLES: dict[str, Callable[..., Oracle]] = {}
"""Registry: oracle name -> class taking the oracle's settings (and resources) as keyword arguments."""

_O = TypeVar("_O")


def register_oracle(name: str) -> Callable[[type[_O]], type[_O]]:
    """Class decorator adding an oracle class to :data:`ORACLES` under ``name``."""

    def decorate(cls: type[_O]) -> type[_O]:
        if name in ORACLES:
            raise ValueError(f"oracle {name!r} is already registered")
        ORACLES[name] = cls  # type: ignore[assignment]
        return cls

    return decorate


def oracle_names() -> list[str]:
    """The names of all registered oracles."""
    return sorted(ORACLES)


def oracle_settings(name: str) -> list[str]:
    """The setting names the oracle ``name`` accepts (its constructor's arguments, less resources)."""
    return sorted(p for p in inspect.signature(_lookup(name)).parameters if p not in RESOURCES)


def make_oracle(
    name: str, settings: Mapping[str, Any] | None = None, *, model: Any = None, tokenizer: Any = None
) -> Oracle:
    """Build the oracle registered as ``name`` with the given settings.

    ``model`` and ``tokenizer`` are the language model (a TransformerBridge) and its tokenizer, for
    oracles that use them (``self_judge``; ``composite`` hands them to its components; ``length``
    penalties in tokens use the tokenizer). Raises ``ValueError`` naming an unknown oracle (and the
    known ones), or unknown settings (and the allowed ones).
    """
    cls = _lookup(name)
    given = dict(settings or {})
    if not all(isinstance(key, str) for key in given):
        raise ValueError(f"oracle {name!r}: setting names must be strings, got {sorted(map(repr, given))}")
    resources = {"model": model, "tokenizer": tokenizer}
    prepare = getattr(cls, "prepare_settings", None)  # an oracle may reshape nested settings first
    if callable(prepare):
        given = dict(prepare(given))
    params = inspect.signature(cls).parameters
    allowed = oracle_settings(name)
    unknown = sorted(key for key in given if key not in params or key in RESOURCES)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for oracle {name!r}; allowed settings: {allowed}")
    missing = sorted(
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty and p.name not in given and p.name not in RESOURCES
    )
    if missing:
        raise ValueError(f"oracle {name!r} needs the setting(s) {missing}; allowed settings: {allowed}")
    kwargs = {key: value for key, value in resources.items() if key in params}
    return cls(**given, **kwargs)


def _lookup(name: str) -> Callable[..., Oracle]:
    if name not in ORACLES:
        raise ValueError(f"unknown oracle {name!r}; known oracles: {oracle_names()}")
    return ORACLES[name]


def check_inputs(prompts: Sequence[str], responses: Sequence[Sequence[str]], oracle: str = "oracle") -> None:
    """Raise ``ValueError`` unless there is one list of response strings per prompt string."""
    if isinstance(prompts, str) or isinstance(responses, str):
        raise ValueError(f"{oracle}: prompts and responses must be sequences (one entry per prompt), not a string")
    if len(prompts) != len(responses):
        raise ValueError(
            f"{oracle}: got {len(prompts)} prompts but {len(responses)} response lists; pass one list per prompt"
        )
    for i, (prompt, group) in enumerate(zip(prompts, responses, strict=True)):
        if not isinstance(prompt, str):
            raise ValueError(f"{oracle}: prompt {i} must be a string, got {type(prompt).__name__}")
        if isinstance(group, str):
            raise ValueError(f"{oracle}: responses[{i}] must be a list of response strings, not one string")
        for k, response in enumerate(group):
            if not isinstance(response, str):
                raise ValueError(f"{oracle}: responses[{i}][{k}] must be a string, got {type(response).__name__}")


def agreement(scores_a: Sequence[Sequence[float]], scores_b: Sequence[Sequence[float]]) -> float:
    """How often oracle A orders two responses of the same prompt as reference oracle B does.

    Over every within-prompt pair whose reference scores ``scores_b`` differ, a pair counts 1 when
    ``scores_a`` orders it the same way, 0 when the opposite way, and 1/2 when ``scores_a`` ties it
    (an oracle with no opinion is a coin flip). Returns the mean, in [0, 1]: the "oracle accuracy"
    that SIMS's improvement argument needs above 1/2. ``nan`` when no pair has distinct reference
    scores.
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"agreement: {len(scores_a)} score lists vs {len(scores_b)}; pass one list per prompt to both")
    total = 0.0
    pairs = 0
    for i, (a, b) in enumerate(zip(scores_a, scores_b, strict=True)):
        if len(a) != len(b):
            raise ValueError(f"agreement: prompt {i} has {len(a)} scores in scores_a but {len(b)} in scores_b")
        for j in range(len(b)):
            for k in range(j + 1, len(b)):
                ref = _sign(float(b[j]) - float(b[k]))
                if ref == 0:
                    continue
                got = _sign(float(a[j]) - float(a[k]))
                total += 1.0 if got == ref else 0.5 if got == 0 else 0.0
                pairs += 1
    return total / pairs if pairs else math.nan


def _sign(x: float) -> int:
    if math.isnan(x):
        raise ValueError("agreement: scores must not be NaN")
    return (x > 0) - (x < 0)


def settings_of(oracle: object) -> dict[str, Any]:
    """A dataclass oracle's settings (its fields less resources and private state), for records."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(oracle) and not isinstance(oracle, type):
        for f in dataclasses.fields(oracle):
            if f.init and f.name not in RESOURCES:
                out[f.name] = getattr(oracle, f.name)
    return out


def check_int(owner: str, minimum: int, **values: Any) -> None:
    """Raise ``ValueError`` for any setting that is not an integer >= ``minimum``."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{owner}: setting {key!r} must be an integer >= {minimum}, got {value!r}")


def check_number(owner: str, minimum: float | None = None, **values: Any) -> None:
    """Raise ``ValueError`` for any setting that is not a finite number (>= ``minimum`` if given)."""
    for key, value in values.items():
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        if bad or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum}"
            raise ValueError(f"{owner}: setting {key!r} must be a finite number{bound}, got {value!r}")


def check_choice(owner: str, key: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}: setting {key!r} must be one of {list(choices)}, got {value!r}")


def check_text(owner: str, **values: Any) -> None:
    """Raise ``ValueError`` for any setting that is not a non-empty string."""
    for key, value in values.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{owner}: setting {key!r} must be non-empty text, got {value!r}")
