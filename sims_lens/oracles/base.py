"""The preference-oracle interface, the oracle registry, and oracle agreement.

An oracle scores the K candidate responses of each prompt; a higher score means a preferred
response. Only the order within a prompt matters to SIMS (it picks D+ and D- from it), so scores
of different oracles need not share a scale. Oracles are small dataclasses whose fields are their
settings (a TOML table maps onto them); the fields ``model`` and ``tokenizer`` are not settings
but the language model an oracle may use (the self-judge), passed by :func:`make_oracle`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from sims_lens.registry import Registry


@runtime_checkable
class Oracle(Protocol):
    """Scores candidate responses: one list of scores per prompt, one score per response.

    Oracles may also declare ``judges_with_policy = True`` (see :func:`judges_with_policy`).
    """

    @property
    def name(self) -> str:
        """Registry name of the oracle (``"lexicon_sentiment"``, ``"self_judge"``, ...)."""
        ...

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        """Score ``responses[i][k]``, the k-th candidate answer to the raw user prompt ``prompts[i]``.

        Returns ``scores[i][k]``; higher means preferred. Prompts are raw user text, not chat-formatted.
        """
        ...


ORACLES: Registry[Oracle] = Registry("oracle", resources=("model", "tokenizer"))
"""Registry: oracle name -> class taking the oracle's settings (and resources) as keyword arguments."""

register_oracle = ORACLES.register


def make_oracle(
    name: str, settings: Mapping[str, Any] | None = None, *, model: Any = None, tokenizer: Any = None
) -> Oracle:
    """Build the oracle registered as ``name`` with the given settings.

    ``model`` and ``tokenizer`` are the language model (a TransformerBridge) and its tokenizer, for
    oracles that use them (``self_judge``; ``composite`` hands them to its components; ``length``
    penalties in tokens use the tokenizer). Raises ``ConfigError`` (a ``ValueError``) naming an
    unknown oracle (and the known ones), or unknown settings (and the allowed ones).
    """
    return ORACLES.make(name, settings, model=model, tokenizer=tokenizer)


def is_relative(oracle: Any) -> bool:
    """Whether ``oracle``'s scores only compare within one call's group of responses.

    A relative oracle (the self-judge's ranks; a composite that normalises per prompt or holds a
    relative part) gives scores that sum to a constant within a group: they rank a prompt's
    responses but mean nothing across prompts or iterations, so its reward means are not reported
    and contrast sampling (which compares across iterations) refuses it. Every registered oracle
    declares ``relative``; an object without the attribute counts as absolute.
    """
    return bool(getattr(oracle, "relative", False))


def judges_with_policy(oracle: Any) -> bool:
    """Whether ``oracle`` judges *as the model it runs on* (SIMS prompt ranking).

    Such an oracle (the self-judge, or a composite holding one) judges with the current policy's
    steering hooks on during training, and as the base model during evaluation. An oracle says so
    with a ``judges_with_policy`` attribute; one without it (a rule, a separate reward model) does not.
    """
    return bool(getattr(oracle, "judges_with_policy", False))


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
