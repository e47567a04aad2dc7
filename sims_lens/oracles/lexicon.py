"""A rule-and-lexicon sentiment oracle: VADER, offline and fast.

It scores the response alone (the prompt is ignored), so it rewards cheerfulness whether or not
the answer is on topic; pair it with a relevance-aware oracle in a ``composite`` where that matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sims_lens.oracles.base import check_inputs, register_oracle
from sims_lens.validation import check_choice

MEASURES = ("compound", "pos", "pos_minus_neg")
"""``compound``: VADER's normalised compound score in [-1, 1]; ``pos``: the positive share of the
text; ``pos_minus_neg``: positive share minus negative share."""


@register_oracle("lexicon_sentiment")
@dataclass
class LexiconSentiment:
    """VADER sentiment of each response (``vaderSentiment.SentimentIntensityAnalyzer``)."""

    name: ClassVar[str] = "lexicon_sentiment"
    relative: ClassVar[bool] = False
    """Scores compare across calls (prompts, iterations): an absolute oracle."""
    measure: str = "compound"
    _analyzer: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_choice(self.name, "measure", self.measure, MEASURES)

    def score_text(self, text: str) -> float:
        """The sentiment of one text under the chosen measure."""
        if self._analyzer is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self._analyzer = SentimentIntensityAnalyzer()
        polarity = self._analyzer.polarity_scores(text)
        if self.measure == "pos_minus_neg":
            return float(polarity["pos"] - polarity["neg"])
        return float(polarity[self.measure])

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        check_inputs(prompts, responses, self.name)
        return [[self.score_text(r) for r in group] for group in responses]
