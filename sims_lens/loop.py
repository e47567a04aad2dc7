"""The SIMS loop: one iteration reads like the paper's algorithm (DESIGN.md section 1).

1. a mini-batch of N prompts; 2. the current policy samples K responses each; 3. the oracle
scores them; 4. D+ / D- pairs (best vs worst, or contrast sampling from a memory bank); 5. the
*base* model's response-token activations at the hook points; 6. the learner fits one function
per layer; 7. the update rule combines it with the previous policy.

:func:`iterate` is a generator of per-iteration results so a notebook can drive the loop step
by step; callbacks receive every phase and every finished iteration (analysis plugs in there;
this module never imports it).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor
from tqdm.auto import tqdm

from sims_lens.capture import capture_tokens, pair_tokens, reduce_tokens
from sims_lens.chat import encode_chat
from sims_lens.config import SimsConfig, resolve_layers
from sims_lens.contrast import MemoryBank, Sample, Selection, group_by_prompt, label_samples, select_pairs
from sims_lens.evaluation import Evaluation, evaluate, head_to_head, heldout_seed
from sims_lens.generation import GenerationSettings, decode_response, generate_ids
from sims_lens.oracles.base import agreement
from sims_lens.prompts import Prompt, sample_batch
from sims_lens.seeds import derive_seed
from sims_lens.steering.functions import SteeringSet
from sims_lens.steering.hooks import apply_steering
from sims_lens.steering.learners import Learner, fisher_ratio, probe_accuracy

MetricRow = dict[str, Any]
"""One tidy metrics row: iteration, split, metric, layer (None where it does not apply), value."""


class NotSeparableError(RuntimeError):
    """The oracle could not separate any prompt's responses, so there is nothing to learn from."""


class Callback(Protocol):
    """Receives the loop's progress; both methods are optional to implement meaningfully."""

    def on_phase(self, iteration: int, phase: str, payload: dict[str, Any]) -> None: ...

    def on_iteration(self, result: IterationResult) -> None: ...


@dataclass
class IterationResult:
    """Everything one iteration produced; analysis callbacks and notebooks consume this."""

    iteration: int
    policy: SteeringSet
    update: SteeringSet
    samples: list[Sample]
    selection: Selection
    hooks: list[str]
    positives: Tensor
    negatives: Tensor
    metrics: list[MetricRow]
    heldout: Evaluation


@dataclass
class LoopState:
    """What carries over from one iteration to the next (and what a resumed run restores)."""

    policy: SteeringSet | None = None
    layers: list[int] | None = None
    bank: MemoryBank | None = None
    base_heldout: Evaluation | None = None


@dataclass
class Sims:
    """A SIMS run in memory: the model, its data, oracle and learner, and the configuration."""

    model: Any
    tokenizer: Any
    config: SimsConfig
    train_prompts: Sequence[Prompt]
    heldout_prompts: Sequence[Prompt]
    oracle: Any
    learner: Learner
    callbacks: Sequence[Callback] = ()
    progress: bool = True
    state: LoopState | None = None
    reference: Any = None
    """An optional second oracle; its agreement with ``oracle`` is logged as ``oracle_agreement``."""

    @property
    def generation(self) -> GenerationSettings:
        c = self.config
        return GenerationSettings(c.max_new_tokens, c.temperature, c.top_p, c.batch_size, True)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _phase(self, iteration: int, phase: str, **payload: Any) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "on_phase"):
                cb.on_phase(iteration, phase, payload)

    def _bar(self, total: int, desc: str, unit: str = "seq") -> Any:
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not self.progress)

    def _policy(self, state: LoopState) -> Any:
        return (
            apply_steering(self.model, state.policy)
            if state.policy is not None and len(state.policy)
            else nullcontext()
        )

    # -- the phases -------------------------------------------------------------------------
    def sample(self, iteration: int, prompts: Sequence[Prompt], state: LoopState) -> list[Sample]:
        """K responses per prompt from the current policy, scored by the oracle."""
        k = self.config.samples_per_prompt
        ids = [encode_chat(self.tokenizer, p.text) for p in prompts for _ in range(k)]
        with self._bar(len(ids), f"iter {iteration}: sampling") as bar, self._policy(state):
            exchanges = generate_ids(
                self.model,
                self.tokenizer,
                ids,
                self.generation,
                seed=derive_seed(self.config.seed, "train", iteration),
                on_batch=bar.update,
            )
        responses = [decode_response(self.tokenizer, ex) for ex in exchanges]
        groups = [responses[i * k : (i + 1) * k] for i in range(len(prompts))]
        # SIMS-PR: the self-judge ranks as the current policy (its hooks stay on while it judges)
        as_policy = getattr(self.oracle, "name", "") == "self_judge"
        scores = self.score(iteration, self.oracle, prompts, groups, state if as_policy else None)
        reference = self.score(iteration, self.reference, prompts, groups, None) if self.reference is not None else None
        return [
            Sample(
                iteration,
                p.id,
                p.text,
                responses[i * k + j],
                exchanges[i * k + j],
                float(scores[i][j]),
                reference_reward=None if reference is None else float(reference[i][j]),
            )
            for i, p in enumerate(prompts)
            for j in range(k)
        ]

    def score(
        self,
        iteration: int,
        oracle: Any,
        prompts: Sequence[Prompt],
        groups: list[list[str]],
        policy_state: LoopState | None,
    ) -> list[list[float]]:
        """An oracle's scores, a few prompts at a time (with a progress bar); under the policy if given."""
        step = max(1, self.config.batch_size // self.config.samples_per_prompt)
        scores: list[list[float]] = []
        policy = self._policy(policy_state) if policy_state is not None else nullcontext()
        with self._bar(len(prompts), f"iter {iteration}: scoring ({oracle.name})", unit="prompt") as bar, policy:
            for start in range(0, len(prompts), step):
                texts = [p.text for p in prompts[start : start + step]]
                scores.extend(oracle.score(texts, groups[start : start + step]))
                bar.update(len(texts))
        return scores

    def select(self, samples: list[Sample], state: LoopState) -> Selection:
        """D+ / D-: this batch's best vs worst, or the highest-margin pairs of the memory bank."""
        c = self.config
        if c.contrast_sampling:
            assert state.bank is not None
            state.bank.add(samples)
            selection = state.bank.select(
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

    def activations(self, iteration: int, selection: Selection, hooks: list[str]) -> tuple[Any, Any]:
        """Base-model response-token activations of D+ and D- (never steered)."""
        pairs = selection.pairs
        with self._bar(2 * len(pairs), f"iter {iteration}: capture") as bar:
            pos = capture_tokens(
                self.model, [p.positive.exchange for p in pairs], hooks, self.pad_id, self.config.batch_size, bar.update
            )
            neg = capture_tokens(
                self.model, [p.negative.exchange for p in pairs], hooks, self.pad_id, self.config.batch_size, bar.update
            )
        return pos, neg

    def choose_layers(self, pos: Tensor, neg: Tensor, n_layers: int) -> list[int]:
        """``top:K``: the K layers whose H+ and H- a held-out linear probe separates best."""
        k = int(str(self.config.layers).split(":")[1])
        accuracy = [probe_accuracy(pos[:, layer], neg[:, layer], seed=self.config.seed) for layer in range(n_layers)]
        return sorted(sorted(range(n_layers), key=lambda layer: (-accuracy[layer], layer))[:k])

    def fit(self, iteration: int, pos_tokens: list[Tensor], neg_tokens: list[Tensor], hooks: list[str]) -> SteeringSet:
        """One steering function per hook from the learner."""
        if self.learner.aggregation == "tokens":
            pos, neg = pair_tokens(pos_tokens, neg_tokens)
        else:
            pos, neg = (
                reduce_tokens(pos_tokens, self.config.aggregation),
                reduce_tokens(neg_tokens, self.config.aggregation),
            )
        functions = []
        for i, hook in enumerate(hooks):
            fn = self.learner.fit(pos[:, i], neg[:, i], hook)
            fn.iteration = iteration
            fn.multiplier *= self.config.multiplier
            functions.append(fn)
        return SteeringSet.from_functions(
            functions,
            positions=self.config.positions,
            model_name=str(getattr(self.model.cfg, "model_name", "")),
            iteration=iteration,
        )

    def combine(self, previous: SteeringSet | None, update: SteeringSet, iteration: int) -> SteeringSet:
        """The update rule: ``refit``, ``accumulate`` (previous + rate * new) or ``ema``."""
        c = self.config
        if previous is None or c.update == "refit":
            policy = update
        elif c.update == "accumulate":
            policy = previous + update.scaled(c.rate)
        else:
            policy = previous.scaled(1.0 - c.rate) + update.scaled(c.rate)
        policy.iteration = iteration
        return policy

    def evaluate_heldout(self, steering: SteeringSet | None, iteration: int) -> Evaluation:
        """Held-out samples of pi_t, scored by the oracle with no steering active.

        The judge stays fixed across iterations (for ``self_judge``: the base model), so held-out
        rewards of different iterations are comparable; during training the policy judges itself.
        """
        return evaluate(
            self.model,
            self.tokenizer,
            self.heldout_prompts,
            self.oracle,
            self.generation,
            steering=steering,
            samples_per_prompt=self.config.eval_samples_per_prompt,
            seed=heldout_seed(self.config.seed),
            reference=self.reference,
        )

    # -- the loop ---------------------------------------------------------------------------
    def start(self, state: LoopState | None = None) -> LoopState:
        state = state or LoopState()
        if state.bank is None and self.config.contrast_sampling:
            state.bank = MemoryBank(self.config.contrast.bank_size)
        if state.layers is None:
            state.layers = resolve_layers(self.config.layers, int(self.model.cfg.n_layers))
        if state.base_heldout is None:
            state.base_heldout = self.evaluate_heldout(None, 0)
        self._phase(0, "base", evaluation=state.base_heldout)
        return state

    def step(self, iteration: int, state: LoopState) -> IterationResult:
        """One SIMS iteration t (1-based); updates ``state`` in place."""
        c = self.config
        prompts = sample_batch(
            self.train_prompts, c.prompts_per_iteration, random.Random(derive_seed(c.seed, "prompts", iteration))
        )
        self._phase(iteration, "sample", prompts=prompts)
        samples = self.sample(iteration, prompts, state)
        selection = self.select(samples, state)
        self._phase(iteration, "select", samples=samples, selection=selection)
        n_layers = int(self.model.cfg.n_layers)
        if state.layers is None:  # top:K, chosen once from the first iteration's activations
            all_hooks = c.hook_names(list(range(n_layers)))
            pos_all, neg_all = self.activations(iteration, selection, all_hooks)
            state.layers = self.choose_layers(reduce_tokens(pos_all, "mean"), reduce_tokens(neg_all, "mean"), n_layers)
            keep = list(state.layers)
            pos_tokens = [t[:, keep] for t in pos_all]
            neg_tokens = [t[:, keep] for t in neg_all]
        else:
            pos_tokens, neg_tokens = self.activations(iteration, selection, c.hook_names(state.layers))
        hooks = c.hook_names(state.layers)
        self._phase(iteration, "capture", hooks=hooks)
        update = self.fit(iteration, pos_tokens, neg_tokens, hooks)
        state.policy = self.combine(state.policy, update, iteration)
        self._phase(iteration, "fit", update=update, policy=state.policy)
        heldout = self.evaluate_heldout(state.policy, iteration)
        positives, negatives = reduce_tokens(pos_tokens, "mean"), reduce_tokens(neg_tokens, "mean")
        assert state.base_heldout is not None
        wins = head_to_head(
            self.oracle, self.heldout_prompts, heldout, state.base_heldout, self.config.eval_samples_per_prompt
        )
        metrics = iteration_metrics(
            iteration,
            samples,
            selection,
            hooks,
            positives,
            negatives,
            update,
            state.policy,
            heldout,
            wins,
            c.seed,
        )
        result = IterationResult(
            iteration, state.policy, update, samples, selection, hooks, positives, negatives, metrics, heldout
        )
        for cb in self.callbacks:
            if hasattr(cb, "on_iteration"):
                cb.on_iteration(result)
        return result

    def iterate(self, state: LoopState | None = None, start_iteration: int = 1) -> Iterator[IterationResult]:
        """Yield the results of iterations ``start_iteration .. config.iterations``."""
        state = self.start(state)
        self.state = state
        for iteration in range(start_iteration, self.config.iterations + 1):
            yield self.step(iteration, state)


def heldout_metrics(iteration: int, evaluation: Evaluation, win_rate_vs_base: float | None) -> list[MetricRow]:
    """Held-out rows; ``win_rate_vs_base`` is None for the base model itself (iteration 0)."""
    rows = [
        _row(iteration, "heldout", "reward_mean", evaluation.reward_mean),
        _row(iteration, "heldout", "perplexity_under_base", evaluation.perplexity),
        _row(iteration, "heldout", "response_length", evaluation.response_length),
    ]
    if evaluation.reference_reward_mean is not None:
        rows.append(_row(iteration, "heldout", "reference_reward_mean", evaluation.reference_reward_mean))
    if win_rate_vs_base is not None:
        rows.append(_row(iteration, "heldout", "win_rate_vs_base", win_rate_vs_base))
    return rows


def iteration_metrics(
    iteration: int,
    samples: Sequence[Sample],
    selection: Selection,
    hooks: Sequence[str],
    positives: Tensor,
    negatives: Tensor,
    update: SteeringSet,
    policy: SteeringSet,
    heldout: Evaluation,
    win_rate_vs_base: float,
    seed: int,
) -> list[MetricRow]:
    """The tidy metrics of one iteration: train-batch statistics, per-layer geometry, held-out scores."""
    rewards = [s.reward for s in samples]
    margins = [p.margin for p in selection.pairs]
    rows = [
        _row(iteration, "train", "reward_mean", sum(rewards) / len(rewards)),
        _row(iteration, "train", "pair_margin_mean", sum(margins) / len(margins)),
        _row(iteration, "train", "pairs", len(selection.pairs)),
        _row(iteration, "train", "dropped_prompts", selection.dropped_prompts),
    ]
    if samples and samples[0].reference_reward is not None:
        groups = group_by_prompt(samples).values()
        rows.append(
            _row(
                iteration,
                "train",
                "oracle_agreement",
                agreement(
                    [[s.reward for s in g] for g in groups],
                    [[float(s.reference_reward or 0.0) for s in g] for g in groups],
                ),
            )
        )
    update_norms, policy_norms = update.norms(), policy.norms()
    for i, hook in enumerate(hooks):
        layer = int(hook.split(".")[1])
        rows.append(_row(iteration, "train", "update_norm", update_norms[hook], layer))
        rows.append(_row(iteration, "train", "policy_norm", policy_norms[hook], layer))
        rows.append(
            _row(
                iteration, "train", "probe_accuracy", probe_accuracy(positives[:, i], negatives[:, i], seed=seed), layer
            )
        )
        rows.append(_row(iteration, "train", "fisher_ratio", fisher_ratio(positives[:, i], negatives[:, i]), layer))
    return rows + heldout_metrics(iteration, heldout, win_rate_vs_base)


def _row(iteration: int, split: str, metric: str, value: float, layer: int | None = None) -> MetricRow:
    return {"iteration": iteration, "split": split, "metric": metric, "layer": layer, "value": float(value)}
