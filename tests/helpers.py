"""Helpers shared by the test files: the tiny SIMS loop, deterministic oracles, prompts, interrupts and runs.

Import them with ``from tests.helpers import ...`` (``tests`` is a package: pytest puts the repository root on
``sys.path`` for its conftest).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sims_lens.loop import Sims
from sims_lens.prompts import Prompt


@dataclass
class LetterOracle:
    """Deterministic: the share of the letter 'e' in a response (a stand-in for a reward model)."""

    name: str = "letter_e"

    def score(self, prompts, responses):
        return [[r.count("e") / max(len(r), 1) + 1e-3 * len(r) for r in group] for group in responses]


@dataclass
class ConstantOracle:
    name: str = "constant"

    def score(self, prompts, responses):
        return [[0.0 for _ in group] for group in responses]


TRAIN = [
    Prompt(f"t{i}", text)
    for i, text in enumerate(
        [
            "Tell me a story",
            "What is the sea?",
            "Write a short poem",
            "How do I cook rice?",
            "Explain gravity",
            "Give me three tips",
            "Describe the weather",
            "What time is it?",
        ]
    )
]
HELDOUT = [Prompt("h0", "Tell me about dogs"), Prompt("h1", "What is a poem?")]


def tiny_sims(tiny, oracle=None, **overrides) -> Sims:
    model, tok = tiny
    settings = {
        "iterations": 2,
        "prompts_per_iteration": 4,
        "samples_per_prompt": 3,
        "max_new_tokens": 6,
        "layers": [0, 1],
        "multiplier": 1.0,
        "margin": 0.0,
        "eval_samples_per_prompt": 1,
        "heldout_size": 2,
        "validation_size": 2,
        "batch_size": 8,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    for key, value in overrides.items():  # a dotted key ("learners.hpr.epochs") sets a nested table
        *tables, leaf = key.split(".")
        target = settings
        for table in tables:
            target = target.setdefault(table, {})
        target[leaf] = value
    parts = {"prompts": TRAIN, "heldout_prompts": HELDOUT, "progress": False}
    parts.update(settings)
    return Sims(model, tok, oracle=oracle or LetterOracle(), **parts)


class Interrupt(Exception):
    pass


class StopAfter:
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def on_phase(self, iteration, phase, payload):
        if iteration == self.iteration and phase == "sample":
            raise Interrupt


class FakeRelevance:
    """Stands in for the MiniLM relevance oracle in unit tests: shared letters of prompt and response."""

    name = "relevance"

    def score(self, prompts, responses):
        return [
            [len(set(p) & set(r)) / max(len(set(p)), 1) for r in g] for p, g in zip(prompts, responses, strict=True)
        ]


def make_run(tiny, out: Path, seed: int) -> Path:
    sims = tiny_sims(tiny, seed=seed, out=out)
    list(sims.iterate())
    return out
