"""Building the positive and negative buffers D+ and D- from scored samples.

Default: per prompt, the best versus the worst of its K responses (or the top k versus the bottom
k). Prompts whose responses the oracle cannot separate (margin below the threshold, or ties) are
dropped and counted.

Contrast sampling (SIMS-CS, ARCHITECTURE.md "The method"): a :class:`MemoryBank` keeps the samples
of every policy so far; prompts recur across iterations, so a prompt's stored samples come from
several policies, and D+/D- pairs are chosen by margin among all of them, past and present. A pair
that has entered the policy once is never chosen again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sims_lens.chat import Exchange, encode_chat


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
    index: int = 0
    """The sample's position among its prompt's K samples of its iteration."""

    @property
    def key(self) -> SampleKey:
        """Where the sample came from: (iteration, prompt id, index)."""
        return (self.iteration, self.prompt_id, self.index)

    def to_record(self) -> dict[str, object]:
        return {
            "iteration": self.iteration,
            "prompt_id": self.prompt_id,
            "index": self.index,
            "prompt": self.prompt,
            "response": self.response,
            "reward": self.reward,
            "label": self.label,
            **({} if self.reference_reward is None else {"reference_reward": self.reference_reward}),
            "response_ids": list(self.exchange.response_ids),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], tokenizer: Any) -> Sample:
        """A sample read back from ``samples.jsonl`` (its prompt chat-encoded again, its response ids as stored)."""
        exchange = Exchange(tuple(encode_chat(tokenizer, record["prompt"])), tuple(record["response_ids"]))
        return cls(
            int(record["iteration"]),
            str(record["prompt_id"]),
            record["prompt"],
            record["response"],
            exchange,
            float(record["reward"]),
            record.get("label", ""),
            record.get("reference_reward"),
            int(record.get("index", 0)),
        )


SampleKey = tuple[int, str, int]
PairKey = tuple[SampleKey, SampleKey]


@dataclass(frozen=True)
class Pair:
    positive: Sample
    negative: Sample

    @property
    def margin(self) -> float:
        return self.positive.reward - self.negative.reward

    @property
    def key(self) -> PairKey:
        return (self.positive.key, self.negative.key)

    @property
    def cross_iteration(self) -> bool:
        """The two sides were sampled by different policies (only contrast sampling makes these)."""
        return self.positive.iteration != self.negative.iteration

    def to_record(self, update: int, applied: bool = True) -> dict[str, object]:
        """The ``pairs.jsonl`` record of this pair, selected in update ``update``.

        ``applied`` is false when the guard rail rejected that update's policy: the pair was fitted
        but never entered a policy (nor the memory bank's used set).
        """

        def side(sample: Sample) -> dict[str, object]:
            return {"iteration": sample.iteration, "index": sample.index, "reward": sample.reward}

        return {
            "update": update,
            "prompt_id": self.positive.prompt_id,
            "positive": side(self.positive),
            "negative": side(self.negative),
            "margin": self.margin,
            "applied": applied,
        }


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
    """Samples of every policy so far (oldest evicted first beyond ``size``), and the pairs already used."""

    size: int = 512
    samples: list[Sample] = field(default_factory=list)
    used: set[PairKey] = field(default_factory=set)

    def add(self, samples: Sequence[Sample]) -> None:
        self.samples.extend(samples)
        if len(self.samples) > self.size:
            del self.samples[: len(self.samples) - self.size]

    def mark_used(self, pairs: Iterable[Pair] | Iterable[PairKey]) -> None:
        """Record pairs that entered the policy; they are never selected again."""
        self.used.update(p.key if isinstance(p, Pair) else p for p in pairs)

    def select(self, *, margin: float, max_pairs: int, pairs_per_prompt: int = 1) -> Selection:
        """The highest-margin unused pairs among each prompt's stored samples, largest gap first.

        Within a prompt every (better, worse) combination of its stored samples is a candidate,
        whichever iterations they come from; up to ``pairs_per_prompt`` pairs with no sample in
        common are taken per prompt, then the ``max_pairs`` largest margins over all prompts.
        """
        groups = group_by_prompt(self.samples)
        chosen = [self._prompt_pairs(group, pairs_per_prompt, margin) for group in groups.values()]
        ranked = sorted((p for pairs in chosen for p in pairs), key=lambda p: (-p.margin, p.key))
        return Selection(ranked[:max_pairs], sum(not pairs for pairs in chosen), len(groups))

    def _prompt_pairs(self, group: Sequence[Sample], k: int, margin: float) -> list[Pair]:
        candidates = [
            Pair(a, b) for a in group for b in group if a.reward - b.reward > margin and (a.key, b.key) not in self.used
        ]
        candidates.sort(key=lambda p: (-p.margin, p.key))
        pairs: list[Pair] = []
        taken: set[SampleKey] = set()
        for pair in candidates:
            if len(pairs) == k:
                break
            if pair.positive.key not in taken and pair.negative.key not in taken:
                pairs.append(pair)
                taken |= {pair.positive.key, pair.negative.key}
        return pairs


def label_samples(samples: Sequence[Sample], selection: Selection) -> None:
    """Mark each of this batch's samples "+" or "-" if this iteration's selection uses it (by identity).

    Under contrast sampling a pair may use samples of earlier iterations, whose records are already
    written: ``pairs.jsonl`` is the full record of what each update learned from.
    """
    positive = {id(s) for s in selection.positives}
    negative = {id(s) for s in selection.negatives}
    for sample in samples:
        sample.label = "+" if id(sample) in positive else "-" if id(sample) in negative else ""
