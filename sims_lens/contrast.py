"""Building the positive and negative buffers D+ and D- from scored samples.

Default: per prompt, the best versus the worst of its K responses (or the top k versus the bottom
k). Prompts whose responses the oracle cannot separate (margin below the threshold, or ties) are
dropped and counted. Contrast sampling (SIMS-CS) keeps a memory bank of past samples across
iterations and chooses the highest-margin pairs above the threshold from it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sims_lens.chat import Exchange


@dataclass
class Sample:
    """One sampled response with its reward; ``label`` is "+", "-" or "" once pairs are chosen."""

    iteration: int
    prompt_id: str
    prompt: str
    response: str
    exchange: Exchange
    reward: float
    label: str = ""
    reference_reward: float | None = None

    def to_record(self) -> dict[str, object]:
        return {
            "iteration": self.iteration,
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "response": self.response,
            "reward": self.reward,
            "label": self.label,
            **({} if self.reference_reward is None else {"reference_reward": self.reference_reward}),
            "response_ids": list(self.exchange.response_ids),
        }


@dataclass(frozen=True)
class Pair:
    positive: Sample
    negative: Sample

    @property
    def margin(self) -> float:
        return self.positive.reward - self.negative.reward


@dataclass
class Selection:
    """The pairs chosen for this iteration and how many prompts could not be separated."""

    pairs: list[Pair]
    dropped_prompts: int
    considered_prompts: int

    @property
    def positives(self) -> list[Sample]:
        return [p.positive for p in self.pairs]

    @property
    def negatives(self) -> list[Sample]:
        return [p.negative for p in self.pairs]


def group_by_prompt(samples: Sequence[Sample]) -> OrderedDict[str, list[Sample]]:
    groups: OrderedDict[str, list[Sample]] = OrderedDict()
    for sample in samples:
        groups.setdefault(sample.prompt_id, []).append(sample)
    return groups


def prompt_pairs(group: Sequence[Sample], k: int, margin: float) -> list[Pair]:
    """The k best of a prompt's responses against its k worst, each pair above ``margin``."""
    ranked = sorted(group, key=lambda s: s.reward, reverse=True)
    pairs = [Pair(ranked[i], ranked[-1 - i]) for i in range(min(k, len(ranked) // 2))]
    return [p for p in pairs if p.margin > margin]


def select_pairs(samples: Sequence[Sample], *, pairs_per_prompt: int = 1, margin: float = 0.0) -> Selection:
    """Best-vs-worst (``pairs_per_prompt=1``) or top-k-vs-bottom-k pairs from this batch."""
    groups = group_by_prompt(samples)
    chosen = [prompt_pairs(group, pairs_per_prompt, margin) for group in groups.values()]
    return Selection([p for pairs in chosen for p in pairs], sum(not pairs for pairs in chosen), len(groups))


@dataclass
class MemoryBank:
    """Past samples across iterations (oldest evicted first beyond ``size``)."""

    size: int = 512
    samples: list[Sample] = field(default_factory=list)

    def add(self, samples: Sequence[Sample]) -> None:
        self.samples.extend(samples)
        if len(self.samples) > self.size:
            del self.samples[: len(self.samples) - self.size]

    def select(self, *, margin: float, max_pairs: int, pairs_per_prompt: int = 1) -> Selection:
        """The highest-margin pairs in the bank (within each prompt), largest gap first."""
        everything = select_pairs(self.samples, pairs_per_prompt=pairs_per_prompt, margin=margin)
        ranked = sorted(everything.pairs, key=lambda p: p.margin, reverse=True)
        return Selection(ranked[:max_pairs], everything.dropped_prompts, everything.considered_prompts)


def label_samples(samples: Sequence[Sample], selection: Selection) -> None:
    """Mark each sample "+" or "-" if this iteration's selection uses it (by identity)."""
    positive = {id(s) for s in selection.positives}
    negative = {id(s) for s in selection.negatives}
    for sample in samples:
        sample.label = "+" if id(sample) in positive else "-" if id(sample) in negative else ""
