"""What one SIMS iteration produces, what carries over to the next, and the callback that hears of both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sims_lens.activations import PairActivations
from sims_lens.contrast import MemoryBank, Sample, Selection
from sims_lens.evaluation import Evaluation
from sims_lens.metrics import MetricRow
from sims_lens.steering.functions import SteeringSet


@dataclass
class LoopState:
    """What carries over from one iteration to the next (and what a resumed run restores)."""

    completed: int = 0
    policy: SteeringSet | None = None
    layers: list[int] | None = None
    bank: MemoryBank | None = None
    base_heldout: Evaluation | None = None
    base_validation: Evaluation | None = None
    """The base model on the validation prompts (the guard rail's reference; recomputed on resume)."""


@dataclass
class IterationResult:
    """Everything one iteration produced; the run folder, analysis callbacks and notebooks read this."""

    iteration: int
    policy: SteeringSet
    """pi_t: the policy after this iteration (the previous one when the guard rail rejected the new one)."""
    fitted: SteeringSet
    """What this iteration's pairs fitted, before the update rule combined it with the policy."""
    samples: list[Sample]
    selection: Selection
    activations: PairActivations
    """The base model's activations of this iteration's pairs (row i: ``selection.pairs[i]``)."""
    metrics: list[MetricRow]
    heldout: Evaluation
    rejected: bool = False
    """The guard rail rejected this iteration's policy: ``policy`` and ``heldout`` are the previous policy's."""

    @property
    def hooks(self) -> list[str]:
        """The steered hook points."""
        return self.activations.hooks


class Callback(Protocol):
    """Receives the loop's progress; both methods are optional to implement meaningfully.

    Phases: ``base`` (payload ``evaluation``, ``fresh``: whether it was computed now, ``metrics``:
    its held-out rows), ``sample``, ``select``, ``capture`` (``hooks``, ``observed_hooks``), ``fit``.
    """

    def on_phase(self, iteration: int, phase: str, payload: dict[str, Any]) -> None: ...

    def on_iteration(self, result: IterationResult) -> None: ...
