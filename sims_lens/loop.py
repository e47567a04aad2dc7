"""The SIMS loop: one iteration is the paper's algorithm, one call per step (ARCHITECTURE.md, "The method").

1. a mini-batch of N prompts; 2. the current policy samples K responses each; 3. the oracle
scores them; 4. D+ / D- pairs (best vs worst, or contrast sampling from a memory bank); 5. the
*base* model's response-token activations at the hook points (in the same forward pass, the
per-sample mean activations at every observed layer, for analysis); 6. the learner fits one
function per layer; 7. the update rule combines it with the previous policy. Then pi_t is
evaluated on held-out prompts.

:meth:`Sims.iterate` is the one iteration generator (the CLI and notebooks both drive it);
callbacks receive every phase and every finished iteration (analysis and the run folder plug in
there; this module never imports either). :class:`LoopState` is all that carries over between
iterations, and :attr:`Sims.state` is its only owner.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sims_lens.answer_cache import generate_cached
from sims_lens.capture import capture_activations, pair_tokens, reduce_tokens
from sims_lens.chat import Exchange, encode_chat, end_token_ids
from sims_lens.config import SimsConfig, resolve_layers, resolve_observe
from sims_lens.contrast import MemoryBank, Sample, Selection, label_samples, select_pairs
from sims_lens.evaluation import Evaluation, evaluate, head_to_head, heldout_seed
from sims_lens.generation import GenerationSettings, decode_response
from sims_lens.groups import chunked
from sims_lens.metrics import MetricRow, batch_rows, heldout_rows, layer_rows, metric_row
from sims_lens.oracles.base import is_relative, judges_with_policy
from sims_lens.prompts import Prompt, iteration_prompts
from sims_lens.seeds import derive_seed
from sims_lens.separability import probe_accuracy
from sims_lens.steering.functions import SteeringSet, layer_of
from sims_lens.steering.hooks import apply_steering
from sims_lens.steering.learners import Learner
from sims_lens.update_rules import apply_update


class NotSeparableError(RuntimeError):
    """The oracle could not separate any prompt's responses, so there is nothing to learn from."""


@dataclass(frozen=True, eq=False)
class Guard:
    """The guard rail's verdict on one iteration's policy (see :meth:`Sims.guard`)."""

    rejected: bool
    rows: list[MetricRow]
    kept_policy: SteeringSet | None = None
    kept_heldout: Evaluation | None = None
    message: str = ""


class PolicyRejectedError(RuntimeError):
    """The guard rail rejected a policy and ``on_rejected = "stop"`` ends the run (the iteration is saved)."""


class Callback(Protocol):
    """Receives the loop's progress; both methods are optional to implement meaningfully.

    Phases: ``base`` (payload ``evaluation``, ``fresh``: whether it was computed now, ``metrics``:
    its held-out rows), ``sample``, ``select``, ``capture`` (``hooks``, ``observed_hooks``), ``fit``.
    """

    def on_phase(self, iteration: int, phase: str, payload: dict[str, Any]) -> None: ...

    def on_iteration(self, result: IterationResult) -> None: ...


@dataclass
class LoopState:
    """What carries over from one iteration to the next (and what a resumed run restores)."""

    completed: int = 0
    policy: SteeringSet | None = None
    layers: list[int] | None = None
    bank: MemoryBank | None = None
    base_heldout: Evaluation | None = None


def _nothing_observed() -> Tensor:
    return torch.zeros(0, 0, 0)


@dataclass(frozen=True, eq=False)
class PairActivations:
    """Step 5's output: the base model's activations of D+ and D- (pair i: ``positives[i]``, ``negatives[i]``)."""

    positives: list[Tensor]
    """Per pair, the positive response's token activations at the steered hooks ``[n_tokens, n_hooks, d_model]``."""
    negatives: list[Tensor]
    observed_positives: Tensor
    """Per pair, the positive response's mean activation at every observed hook ``[n_pairs, n_observed, d_model]``."""
    observed_negatives: Tensor


@dataclass
class Batch:
    """Steps 1-5 of one iteration: the prompts, their scored samples, D+/D- and its activations."""

    prompts: list[Prompt]
    samples: list[Sample]
    selection: Selection
    hooks: list[str]
    positives: list[Tensor]
    """Per pair, the positive response's token activations ``[n_tokens, n_hooks, d_model]``."""
    negatives: list[Tensor]
    observed_hooks: list[str] = field(default_factory=list)
    """The observed hook points (config ``observe``), whatever the steered ones are."""
    observed_positives: Tensor = field(default_factory=_nothing_observed)
    """Per pair, the positive response's mean activation at every observed hook, ``[n_pairs, n_observed, d_model]``."""
    observed_negatives: Tensor = field(default_factory=_nothing_observed)

    @property
    def groups(self) -> list[str]:
        """The prompt id of every pair (the folds of the separability measures are grouped by it)."""
        return [pair.positive.prompt_id for pair in self.selection.pairs]

    def at_layers(self, keep: list[int], hooks: list[str]) -> Batch:
        """The same batch with the activations of the hooks at positions ``keep`` only (observed ones stay)."""
        return replace(
            self,
            hooks=hooks,
            positives=[t[:, keep] for t in self.positives],
            negatives=[t[:, keep] for t in self.negatives],
        )


@dataclass
class IterationResult:
    """Everything one iteration produced; analysis callbacks and notebooks consume this."""

    iteration: int
    policy: SteeringSet
    fitted: SteeringSet
    """What this iteration's pairs fitted, before the update rule combined it with the policy."""
    samples: list[Sample]
    selection: Selection
    hooks: list[str]
    positives: Tensor
    """Mean response-token activation of every D+ sample, ``[n_pairs, n_hooks, d_model]``."""
    negatives: Tensor
    metrics: list[MetricRow]
    heldout: Evaluation
    groups: list[str] = field(default_factory=list)
    """The prompt id of every pair (row i of the activations is ``selection.pairs[i]``)."""
    observed_hooks: list[str] = field(default_factory=list)
    """The observed hook points (config ``observe``; empty for ``"none"``)."""
    observed_positives: Tensor = field(default_factory=_nothing_observed)
    """Mean response-token activation of every D+ sample at every observed hook, ``[n_pairs, n_observed, d_model]``
    (the base model's, captured in the same forward pass as ``positives``)."""
    observed_negatives: Tensor = field(default_factory=_nothing_observed)
    rejected: bool = False
    """The guard rail rejected this iteration's policy: ``policy`` and ``heldout`` are the previous policy's."""

    @property
    def observed_layers(self) -> list[int]:
        """The layer of every observed hook."""
        return [layer for hook in self.observed_hooks if (layer := layer_of(hook)) is not None]


@dataclass
class Sims:
    """A SIMS run in memory: the model, its data, oracle and learner, the configuration and the state."""

    model: Any
    tokenizer: Any
    config: SimsConfig
    train_prompts: Sequence[Prompt]
    heldout_prompts: Sequence[Prompt]
    oracle: Any
    learner: Learner
    callbacks: Sequence[Callback] = ()
    progress: bool = True
    reference: Any = None
    """An optional second oracle; its agreement with ``oracle`` is logged as ``oracle_agreement``."""
    state: LoopState = field(default_factory=LoopState)
    _collected: dict[int, Batch] = field(default_factory=dict, repr=False)

    # -- the loop ---------------------------------------------------------------------------
    def iterate(self) -> Iterator[IterationResult]:
        """Yield iterations ``state.completed + 1 .. config.iterations`` (a resumed state goes on)."""
        self.prepare()
        while self.state.completed < self.config.iterations:
            yield self.step(self.state.completed + 1)

    def prepare(self) -> None:
        """Before the loop: the memory bank, the base model's held-out evaluation, the steered layers."""
        resolve_observe(self.config.observe, self.n_layers)  # an observed layer the model lacks fails before any work
        if self.state.bank is None and self.config.contrast_sampling:
            self.state.bank = MemoryBank(self.config.contrast.bank_size)
        fresh = self.state.base_heldout is None
        if self.state.base_heldout is None:
            self.state.base_heldout = self.evaluate(None)
        rows = heldout_rows(0, self.state.base_heldout, None, **self._relative)
        self._phase(0, "base", evaluation=self.state.base_heldout, fresh=fresh, metrics=rows)
        if self.state.layers is None:
            self.state.layers = resolve_layers(self.config.layers, self.n_layers) or self.choose_layers()

    def step(self, iteration: int) -> IterationResult:
        """One SIMS iteration t (1-based), the paper's seven steps; advances :attr:`state`."""
        batch = self._collected.pop(iteration, None) or self.collect(iteration, self.hooks)  # steps 1-5
        fitted = self.fit(iteration, batch)  # step 6
        policy = apply_update(self.state.policy, fitted, self.config.update, self.config.rate)  # step 7
        if self.state.bank is not None:  # contrast sampling: these pairs have entered the policy
            self.state.bank.mark_used(batch.selection.pairs)
        self._phase(iteration, "fit", fitted=fitted, policy=policy)
        heldout = self.evaluate(policy)
        assert self.state.base_heldout is not None
        guard = self.guard(iteration, fitted, heldout)
        if guard.rejected:
            assert guard.kept_policy is not None and guard.kept_heldout is not None
            policy, heldout = guard.kept_policy, guard.kept_heldout
        wins = head_to_head(
            self.oracle, self.heldout_prompts, heldout, self.state.base_heldout, self.config.eval_samples_per_prompt
        )
        positives, negatives = reduce_tokens(batch.positives, "mean"), reduce_tokens(batch.negatives, "mean")
        metrics = [
            *batch_rows(iteration, batch.samples, batch.selection, relative=self._relative["relative"]),
            *layer_rows(
                iteration,
                hooks=batch.hooks,
                positives=positives,
                negatives=negatives,
                groups=batch.groups,
                fitted=fitted,
                policy=policy,
                seed=self.config.seed,
            ),
            *heldout_rows(iteration, heldout, wins, **self._relative),
            *guard.rows,
        ]
        self.state.policy, self.state.completed = policy, iteration
        result = IterationResult(
            iteration,
            policy,
            fitted,
            batch.samples,
            batch.selection,
            batch.hooks,
            positives,
            negatives,
            metrics,
            heldout,
            groups=batch.groups,
            observed_hooks=list(batch.observed_hooks),
            observed_positives=batch.observed_positives,
            observed_negatives=batch.observed_negatives,
            rejected=guard.rejected,
        )
        for cb in self.callbacks:
            if hasattr(cb, "on_iteration"):
                cb.on_iteration(result)
        if guard.rejected and self.config.on_rejected == "stop":
            raise PolicyRejectedError(guard.message)
        return result

    def guard(self, iteration: int, fitted: SteeringSet, candidate: Evaluation) -> Guard:
        """The guard rail: reject a policy whose held-out perplexity is ``max_perplexity_ratio`` x the base's.

        A rejected policy is replaced by the previous one (pi_0 at iteration 1: the fit at multiplier 0,
        so the run folder still holds a policy file per iteration) and its held-out evaluation; the
        previous policy is evaluated again, with the same held-out seed, so this reproduces its samples.
        """
        assert self.state.base_heldout is not None
        limit = self.config.max_perplexity_ratio
        ratio = candidate.perplexity / self.state.base_heldout.perplexity
        rejected = limit > 0 and ratio > limit
        rows = [
            metric_row(iteration, "guard", "perplexity_ratio", ratio),
            metric_row(iteration, "guard", "rejected", float(rejected)),
        ]
        if not rejected:
            return Guard(False, rows)
        if not self._relative["relative"]:
            rows.append(metric_row(iteration, "guard", "rejected_reward_mean", candidate.reward_mean))
        previous = self.state.policy
        kept = previous if previous is not None else fitted.scaled(0.0)
        kept_heldout = self.state.base_heldout if previous is None else self.evaluate(previous)
        message = (
            f"iteration {iteration}'s policy raised held-out perplexity under the base model to {ratio:.1f} x the base "
            f"model's ({candidate.perplexity:.1f} vs {self.state.base_heldout.perplexity:.1f}; max_perplexity_ratio = "
            f"{limit:g}), so it was rejected and the previous policy kept. Lower 'multiplier', steer other layers, or "
            "raise max_perplexity_ratio"
        )
        return Guard(True, rows, kept, kept_heldout, message)

    def collect(self, iteration: int, hooks: list[str]) -> Batch:
        """Steps 1-5: prompts, K samples each from the current policy, scores, D+/D-, base activations."""
        prompts = self.prompts(iteration)
        self._phase(iteration, "sample", prompts=prompts)
        exchanges = self.sample(iteration, prompts)
        samples = self.score(iteration, prompts, exchanges)
        selection = self.select(samples)
        self._phase(iteration, "select", samples=samples, selection=selection)
        observed = self.observed_hooks
        captured = self.capture_pairs(iteration, selection, hooks, observed)
        self._phase(iteration, "capture", hooks=hooks, observed_hooks=observed)
        return Batch(
            prompts,
            samples,
            selection,
            hooks,
            captured.positives,
            captured.negatives,
            observed_hooks=observed,
            observed_positives=captured.observed_positives,
            observed_negatives=captured.observed_negatives,
        )

    # -- the steps ----------------------------------------------------------------------------
    def prompts(self, iteration: int) -> list[Prompt]:
        """Step 1: N training prompts: drawn afresh, or a recurring pool's turn (contrast sampling)."""
        c = self.config
        return iteration_prompts(self.train_prompts, c.prompts_per_iteration, iteration, c.seed, c.pool_size)

    def sample(self, iteration: int, prompts: Sequence[Prompt]) -> list[Exchange]:
        """Step 2: K responses per prompt from the current policy pi_{t-1} (prompt-major)."""
        k = self.config.samples_per_prompt
        ids = [encode_chat(self.tokenizer, p.text) for p in prompts for _ in range(k)]
        with self._bar(len(ids), f"iter {iteration}: sampling") as bar, self._policy():
            return generate_cached(  # pi_0's samples (iteration 1) are read back in runs that share them
                self.model,
                self.tokenizer,
                ids,
                self.generation,
                derive_seed(self.config.seed, "train", iteration),
                on_batch=bar.update,
            )

    def score(self, iteration: int, prompts: Sequence[Prompt], exchanges: Sequence[Exchange]) -> list[Sample]:
        """Step 3: the oracle's scores (and the reference oracle's, if any) of every response.

        An oracle that judges as the model it runs on (the self-judge: SIMS prompt ranking) judges
        as the current policy, with its steering on.
        """
        responses = chunked([decode_response(self.tokenizer, ex) for ex in exchanges], self.config.samples_per_prompt)
        scores = self._scores(iteration, self.oracle, prompts, responses, judges_with_policy(self.oracle))
        reference = (
            self._scores(iteration, self.reference, prompts, responses, False) if self.reference is not None else None
        )
        k = self.config.samples_per_prompt
        return [
            Sample(
                iteration,
                p.id,
                p.text,
                responses[i][j],
                exchanges[i * k + j],
                float(scores[i][j]),
                reference_reward=None if reference is None else float(reference[i][j]),
                index=j,
            )
            for i, p in enumerate(prompts)
            for j in range(k)
        ]

    def select(self, samples: list[Sample]) -> Selection:
        """Step 4: D+ / D-: this batch's best vs worst, or the highest-margin pairs of the memory bank."""
        c = self.config
        if c.contrast_sampling:
            assert self.state.bank is not None
            self.state.bank.add(samples)
            selection = self.state.bank.select(
                margin=c.margin, max_pairs=c.contrast.max_pairs, pairs_per_prompt=c.pairs_per_prompt
            )
        else:
            selection = select_pairs(samples, pairs_per_prompt=c.pairs_per_prompt, margin=c.margin)
        if len(selection.pairs) < 2:
            raise NotSeparableError(
                f"the oracle {getattr(self.oracle, 'name', '?')!r} separated only {len(selection.pairs)} of "
                f"{selection.considered_prompts} prompts by more than margin={c.margin}; lower 'margin', raise "
                "'samples_per_prompt' or 'temperature', or use an oracle that distinguishes these responses"
            )
        label_samples(samples, selection)
        return selection

    def capture_pairs(
        self, iteration: int, selection: Selection, hooks: list[str], observed: Sequence[str] = ()
    ) -> PairActivations:
        """Step 5: the *base* model's activations of D+ and D- (never steered), in one forward pass per batch.

        Response tokens at the steered ``hooks`` (for the learner) and, per sample, their mean at the
        ``observed`` hooks (for analysis; a hook in both is captured once).
        """
        pad, size = int(self.tokenizer.pad_token_id), self.config.batch_size
        ends = end_token_ids(self.tokenizer)  # an end-of-turn token is never part of a response's span
        sides = ([p.positive.exchange for p in selection.pairs], [p.negative.exchange for p in selection.pairs])
        with self._bar(2 * len(selection.pairs), f"iter {iteration}: capture") as bar:
            positives, negatives = (
                capture_activations(self.model, side, hooks, pad, size, bar.update, end_ids=ends, mean_hooks=observed)
                for side in sides
            )
        return PairActivations(positives.tokens, negatives.tokens, positives.means, negatives.means)

    def capture(self, iteration: int, selection: Selection, hooks: list[str]) -> tuple[list[Tensor], list[Tensor]]:
        """The steered hooks' response-token activations of D+ and D- only (:meth:`capture_pairs` observing nothing)."""
        captured = self.capture_pairs(iteration, selection, hooks)
        return captured.positives, captured.negatives

    def fit(self, iteration: int, batch: Batch) -> SteeringSet:
        """Step 6: one steering function per hook from the learner, scaled by ``multiplier``."""
        if self.learner.inputs == "token_pairs":
            pos, neg = pair_tokens(batch.positives, batch.negatives)
        else:
            pos = reduce_tokens(batch.positives, self.config.reduction)
            neg = reduce_tokens(batch.negatives, self.config.reduction)
        functions = []
        for i, hook in enumerate(batch.hooks):
            fn = self.learner.fit(pos[:, i], neg[:, i], hook)
            fn.iteration = iteration
            fn.multiplier *= self.config.multiplier
            functions.append(fn)
        return SteeringSet.from_functions(
            functions,
            positions=self.positions,
            model_name=str(getattr(self.model.cfg, "model_name", "")),
            iteration=iteration,
        )

    def evaluate(self, policy: SteeringSet | None) -> Evaluation:
        """Held-out samples of a policy (None: the base model), scored with no steering active.

        The judge stays fixed across iterations (for the self-judge: the base model), so held-out
        rewards of different iterations are comparable; during training the policy judges itself.
        """
        return evaluate(
            self.model,
            self.tokenizer,
            self.heldout_prompts,
            self.oracle,
            self.generation,
            steering=policy,
            samples_per_prompt=self.config.eval_samples_per_prompt,
            seed=heldout_seed(self.config.seed),
            reference=self.reference,
        )

    def choose_layers(self) -> list[int]:
        """``layers = "top:K"``: the K layers whose D+ and D- a probe separates best, cross-validated by prompt.

        Chosen before the loop from iteration 1's batch captured at every layer (the policy of
        iteration 1 is the base model, so this is exactly the batch iteration 1 uses; it is kept).
        """
        k = int(str(self.config.layers).removeprefix("top:"))
        everything = list(range(self.n_layers))
        batch = self.collect(1, self.config.hook_names(everything))
        pos, neg = reduce_tokens(batch.positives, "mean"), reduce_tokens(batch.negatives, "mean")
        groups = [pair.positive.prompt_id for pair in batch.selection.pairs]
        if len(set(groups)) < 2:
            raise NotSeparableError(
                f"layers = {self.config.layers!r} needs pairs from at least 2 prompts to cross-validate probes; the "
                f"oracle separated {len(set(groups))}. Raise 'prompts_per_iteration' or list the layers instead"
            )
        accuracy = [probe_accuracy(pos[:, layer], neg[:, layer], groups, seed=self.config.seed) for layer in everything]
        layers = sorted(sorted(everything, key=lambda layer: (-accuracy[layer], layer))[:k])
        self._collected[1] = batch.at_layers(layers, self.config.hook_names(layers))
        return layers

    # -- helpers ------------------------------------------------------------------------------
    @property
    def _relative(self) -> dict[str, bool]:
        """Whether the oracle's (and the reference oracle's) scores only compare within a group."""
        return {"relative": is_relative(self.oracle), "relative_reference": is_relative(self.reference)}

    @property
    def positions(self) -> str:
        """The position policy of every fit: the config's, or for "auto" the learner's own default."""
        if self.config.positions == "auto":
            return str(getattr(self.learner, "positions", "all"))
        return self.config.positions

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def hooks(self) -> list[str]:
        """The steered hook points (known once :meth:`prepare` has run)."""
        assert self.state.layers is not None, "call prepare() (or iterate()) first"
        return self.config.hook_names(self.state.layers)

    @property
    def observed_hooks(self) -> list[str]:
        """The observed hook points: the ``observe`` layers at ``hook`` (empty for ``observe = "none"``)."""
        return self.config.hook_names(resolve_observe(self.config.observe, self.n_layers))

    @property
    def generation(self) -> GenerationSettings:
        c = self.config
        return GenerationSettings(c.max_new_tokens, c.temperature, c.top_p, c.batch_size, True)

    def _scores(
        self, iteration: int, oracle: Any, prompts: Sequence[Prompt], groups: list[list[str]], as_policy: bool
    ) -> list[list[float]]:
        """An oracle's scores, a few prompts at a time (with a progress bar); as the policy if asked."""
        step = max(1, self.config.batch_size // self.config.samples_per_prompt)
        scores: list[list[float]] = []
        policy = self._policy() if as_policy else nullcontext()
        with self._bar(len(prompts), f"iter {iteration}: scoring ({oracle.name})", unit="prompt") as bar, policy:
            for start in range(0, len(prompts), step):
                texts = [p.text for p in prompts[start : start + step]]
                scores.extend(oracle.score(texts, groups[start : start + step]))
                bar.update(len(texts))
        return scores

    def _policy(self) -> AbstractContextManager[Any]:
        """The current policy's steering hooks on the model (nothing for pi_0)."""
        policy = self.state.policy
        return apply_steering(self.model, policy) if policy is not None and len(policy) else nullcontext()

    def _phase(self, iteration: int, phase: str, **payload: Any) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "on_phase"):
                cb.on_phase(iteration, phase, payload)

    def _bar(self, total: int, desc: str, unit: str = "seq") -> Any:
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not self.progress)
