"""The SIMS loop: one iteration is the paper's algorithm, one call per step (ARCHITECTURE.md, "The method").

1. a mini-batch of N prompts; 2. the current policy samples K responses each; 3. the oracle
scores them; 4. D+ / D- pairs (best vs worst, or contrast sampling from a memory bank); 5. the
*base* model's response-token activations at the hook points (in the same forward pass, the
per-sample mean activations at every observed layer, for analysis); 6. the learner fits one
function per layer; 7. the update rule combines it with the previous policy. Then pi_t is
evaluated on held-out prompts.

``Sims(model, tokenizer, oracle=..., learner=..., **settings)`` is the one constructor (the CLI's
:meth:`Sims.from_config` and notebooks both reach it); :meth:`Sims.iterate` is the one iteration
generator. Callbacks receive every phase and every finished iteration (analysis plugs in there;
this module never imports it); ``out=`` adds the run-folder writer. :class:`LoopState` is all that
carries over between iterations, and :attr:`Sims.state` is its only owner.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sims_lens.activations import PairActivations
from sims_lens.answer_cache import generate_cached
from sims_lens.assemble import (
    PromptSource,
    build_config,
    check_run,
    initial_policy,
    oracle_name,
    prompt_lists,
    recorded_config,
    resolve_learner,
    resolve_oracle,
    resolve_prompts,
)
from sims_lens.batching import nominal
from sims_lens.chat import Exchange, encode_chat
from sims_lens.config import SimsConfig, resolve_layers, resolve_observe
from sims_lens.contrast import MemoryBank, Sample, Selection, label_samples, select_pairs
from sims_lens.evaluation import Evaluation, evaluate, head_to_head, heldout_seed
from sims_lens.fitting import capture_selected, fit_steering, learner_positions
from sims_lens.generation import GenerationSettings, decode_response
from sims_lens.groups import chunked
from sims_lens.iteration import Callback, IterationResult, LoopState
from sims_lens.metrics import MetricRow, batch_rows, heldout_rows, layer_rows, metric_row
from sims_lens.oracles.base import is_relative, judges_with_policy
from sims_lens.prompts import Prompt, iteration_prompts, split_validation
from sims_lens.run import writing_run_folder
from sims_lens.seeds import derive_seed
from sims_lens.separability import probe_accuracy
from sims_lens.steering.functions import SteeringSet
from sims_lens.steering.hooks import apply_steering, check_hooks
from sims_lens.steering.learners import Learner
from sims_lens.update_rules import apply_update

DEFAULT_MODEL = SimsConfig().model

__all__ = [
    "Callback",
    "IterationResult",
    "LoopState",
    "NotSeparableError",
    "PolicyRejectedError",
    "Sims",
    "sims_from_config",
]


class NotSeparableError(RuntimeError):
    """The oracle could not separate any prompt's responses, so there is nothing to learn from."""


@dataclass(frozen=True, eq=False)
class Guard:
    """The guard rail's verdict on one iteration's policy (see :meth:`Sims.guard`)."""

    rejected: bool
    rows: list[MetricRow]
    kept_policy: SteeringSet | None = None
    message: str = ""


class PolicyRejectedError(RuntimeError):
    """The guard rail rejected a policy and ``on_rejected = "stop"`` ends the run (the iteration is saved)."""


@dataclass
class Batch:
    """Steps 1-5 of one iteration: the prompts, their scored samples, D+/D- and its activations."""

    prompts: list[Prompt]
    samples: list[Sample]
    selection: Selection
    activations: PairActivations


class Sims:
    """A SIMS run in memory: the model, its data, oracle and learner, the configuration and the state.

    Args:
        model, tokenizer: a TransformerBridge and its tokenizer (:func:`sims_lens.load_model`); a
            model name or path instead loads it (``dtype``/``device`` settings apply).
        oracle: a registered oracle name, an object with ``score(prompts, responses)``, or a plain
            function ``f(prompts, responses) -> scores`` (``responses[i]``: the K responses to
            ``prompts[i]``; one list of K floats per prompt comes back). Default: ``config.oracle``.
        oracle_relative: for a function oracle, whether its scores only rank one prompt's responses
            (default: absolute, comparable across prompts and iterations).
        learner: a registered learner name or a learner object. Default: ``config.learner``.
        prompts, heldout_prompts: lists of strings or :class:`Prompt`, a file (.jsonl/.csv/.txt),
            ``"builtin"`` or ``"hf:NAME[:SPLIT]"``. Held-out prompts are cut to ``heldout_size``.
        reference_oracle: a second oracle (name, object or function); its agreement is logged.
        init: the policy to start from (a SteeringSet or a ``.safetensors`` file); default pi_0.
        out: a run folder to write (resumable); ``resume=True`` goes on from its last iteration.
        callbacks: loop callbacks (``on_phase``, ``on_iteration``); ``progress``: progress bars.
        config: a :class:`SimsConfig` to start from; it is never changed.
        **settings: any other configuration key (``iterations=3``, ``layers=[15]``, ...), validated
            with the TOML keys' messages; a nested table is a dict or its dataclass.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        oracle: Any = None,
        learner: str | Learner | None = None,
        prompts: PromptSource = None,
        heldout_prompts: PromptSource = None,
        reference_oracle: Any = None,
        oracle_relative: bool | None = None,
        init: SteeringSet | str | os.PathLike[str] | None = None,
        out: str | os.PathLike[str] | None = None,
        resume: bool = False,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
        config: SimsConfig | None = None,
        **settings: Any,
    ) -> None:
        names = {  # the settings that name what was given as a string
            key: os.fspath(value)
            for key, value in (
                ("model", model),
                ("oracle", oracle),
                ("learner", learner),
                ("reference_oracle", reference_oracle),
                ("prompts", prompts),
                ("heldout_prompts", heldout_prompts),
                ("init", init),
            )
            if isinstance(value, str | os.PathLike)
        }
        named_model = "model" in names or "model" in settings or (config is not None and config.model != DEFAULT_MODEL)
        config = build_config(config, {**settings, **names})
        if model is None or isinstance(model, str | os.PathLike):
            from sims_lens.models import load_model

            model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
        if tokenizer is None:
            raise TypeError("Sims() needs the model's tokenizer: Sims(model, tokenizer, ...) (load_model returns both)")
        self.model, self.tokenizer = model, tokenizer
        self.out, self.resume = (None if out is None else Path(out)), resume
        self.oracle = resolve_oracle(
            config.oracle if oracle is None else oracle, config, model, tokenizer, relative=oracle_relative
        )
        reference = config.reference_oracle if reference_oracle is None else reference_oracle
        self.reference = None
        if reference is not None and not (isinstance(reference, str) and not reference):
            self.reference = resolve_oracle(reference, config, model, tokenizer, key="reference_oracle")
        self.learner = resolve_learner(learner, config)
        self.given_prompts = prompt_lists(config, {"prompts": prompts, "heldout_prompts": heldout_prompts}, out, resume)
        """Prompts given as lists (all of them; a run folder keeps a copy), by configuration key."""
        training = self.given_prompts.get("prompts") or resolve_prompts(config.prompts, "train", "prompts")
        aside = min(config.validation_size, len(training) - 1) if config.uses_validation else 0  # check_run says
        self.train_prompts, self.validation_prompts = split_validation(training, aside)
        """Prompts iterations draw from, and those set aside for the loop's choices (``validation_size``)."""
        heldout = self.given_prompts.get("heldout_prompts") or resolve_prompts(
            config.heldout_prompts, "heldout", "heldout_prompts"
        )
        self.heldout_prompts = heldout[: config.heldout_size]
        n_layers = int(model.cfg.n_layers)
        check_run(config, self.oracle, self.train_prompts, self.heldout_prompts, n_layers, self.validation_prompts)
        check_hooks(model, config.hook_names([0]))  # the hook point exists in this architecture
        self.init = initial_policy(
            config.init if init is None or isinstance(init, str | os.PathLike) else init, model, out, resume
        )
        parts = {
            "oracle": (oracle, self.oracle),
            "reference_oracle": (reference_oracle, self.reference),
            "learner": (learner, self.learner),
        }
        self.config = recorded_config(config, model, parts, self.given_prompts, init, model_named=named_model)
        self.callbacks: list[Any] = list(callbacks)
        self.progress = progress
        if self.out is not None:
            from sims_lens.run_folder import RunFolder, check_new_folder

            if not resume:
                check_new_folder(self.out)
            RunFolder(self.out).refuse_if_locked()
        self.state = LoopState(policy=self.init)

    @classmethod
    def from_config(cls, config: SimsConfig, *, model: Any = None, tokenizer: Any = None, **kwargs: Any) -> Sims:
        """The run a configuration names: loads its model (unless given), prompts, oracle and learner."""
        return cls(model, tokenizer, config=config, **kwargs)

    @property
    def policy(self) -> SteeringSet | None:
        """The current policy pi_t (None before the first iteration, unless started from ``init``)."""
        return self.state.policy

    def run(self) -> list[IterationResult]:
        """Every remaining iteration; the results in order."""
        return list(self.iterate())

    def iterate(self) -> Iterator[IterationResult]:
        """Yield iterations ``state.completed + 1 .. config.iterations`` (a resumed state goes on).

        With ``out``, the run folder is locked while this runs, every finished iteration is written
        to it, and a resumed run starts after its last finished iteration.
        """
        with ExitStack() as stack:
            if self.out is not None:
                stack.enter_context(writing_run_folder(self))
            self.prepare()
            while self.state.completed < self.config.iterations:
                yield self.step(self.state.completed + 1)

    def prepare(self) -> None:
        """Before the loop: the memory bank, the base model on held-out and validation prompts, the layers."""
        if self.state.bank is None and self.config.contrast_sampling:
            self.state.bank = MemoryBank(self.config.contrast.bank_size)
        fresh = self.state.base_heldout is None
        if self.state.base_heldout is None:
            self.state.base_heldout = self.evaluate(None)
        rows = heldout_rows(0, self.state.base_heldout, None, **self._relative)
        self._phase(0, "base", evaluation=self.state.base_heldout, fresh=fresh, metrics=rows)
        if self.state.base_validation is None and self.config.max_perplexity_ratio > 0:
            self.state.base_validation = self.validate(None)
        if self.state.layers is None:
            self.state.layers = resolve_layers(self.config.layers, self.n_layers) or self.choose_layers()

    def step(self, iteration: int) -> IterationResult:
        """One SIMS iteration t (1-based), the paper's seven steps; advances :attr:`state`."""
        batch = self.collect(iteration, self.hooks)  # steps 1-5
        fitted = self.fit(iteration, batch)  # step 6
        policy = apply_update(self.state.policy, fitted, self.config.update, self.config.rate)  # step 7
        self._phase(iteration, "fit", fitted=fitted, policy=policy)
        guard = self.guard(iteration, fitted, policy)
        if guard.rejected:
            assert guard.kept_policy is not None
            policy = guard.kept_policy
        elif self.state.bank is not None:  # contrast sampling: these pairs have entered the policy
            self.state.bank.mark_used(batch.selection.pairs)
        assert self.state.base_heldout is not None
        reproduces_base = guard.rejected and self.state.policy is None  # the kept policy is pi_0's zero fit
        heldout = self.state.base_heldout if reproduces_base else self.evaluate(policy)
        wins = head_to_head(
            self.oracle, self.heldout_prompts, heldout, self.state.base_heldout, self.config.eval_samples_per_prompt
        )
        positives, negatives = batch.activations.reduced("mean")
        metrics = [
            *batch_rows(iteration, batch.samples, batch.selection, relative=self._relative["relative"]),
            *layer_rows(
                iteration,
                hooks=batch.activations.hooks,
                positives=positives,
                negatives=negatives,
                prompt_ids=batch.activations.prompt_ids,
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
            batch.activations,
            metrics,
            heldout,
            rejected=guard.rejected,
        )
        for cb in self.callbacks:
            if hasattr(cb, "on_iteration"):
                cb.on_iteration(result)
        if guard.rejected and self.config.on_rejected == "stop":
            raise PolicyRejectedError(guard.message)
        return result

    def guard(self, iteration: int, fitted: SteeringSet, policy: SteeringSet) -> Guard:
        """The guard rail: reject a policy whose validation perplexity is ``max_perplexity_ratio`` x the base's.

        Judged on the validation prompts (never on the held-out ones, which only report). A rejected
        policy is replaced by the previous one (at iteration 1: ``init``, or pi_0 as the fit at
        multiplier 0, so the run folder still holds a policy file per iteration); its pairs are
        recorded as not applied and stay unused in the memory bank.
        """
        limit = self.config.max_perplexity_ratio
        if limit <= 0:
            return Guard(False, [])
        assert self.state.base_validation is not None
        candidate = self.validate(policy)
        ratio = candidate.perplexity / self.state.base_validation.perplexity
        rejected = ratio > limit
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
        message = (
            f"iteration {iteration}'s policy raised validation perplexity under the base model to {ratio:.1f} x the "
            f"base model's ({candidate.perplexity:.1f} vs {self.state.base_validation.perplexity:.1f}; "
            f"max_perplexity_ratio = {limit:g}), so it was rejected and the previous policy kept. Lower 'multiplier', "
            "steer other layers, or raise max_perplexity_ratio"
        )
        return Guard(True, rows, kept, message)

    def collect(self, iteration: int, hooks: list[str]) -> Batch:
        """Steps 1-5: prompts, K samples each from the current policy, scores, D+/D-, base activations."""
        prompts = self.prompts(iteration)
        self._phase(iteration, "sample", prompts=prompts)
        exchanges = self.sample(iteration, prompts)
        samples = self.score(iteration, prompts, exchanges)
        selection = self.select(samples)
        self._phase(iteration, "select", samples=samples, selection=selection)
        observed = self.observed_hooks
        activations = self.capture(iteration, selection, hooks, observed)
        self._phase(iteration, "capture", hooks=hooks, observed_hooks=observed)
        return Batch(prompts, samples, selection, activations)

    # -- the steps ----------------------------------------------------------------------------
    def prompts(self, iteration: int) -> list[Prompt]:
        """Step 1: N training prompts: drawn afresh, or a recurring pool's turn (contrast sampling)."""
        c = self.config
        return iteration_prompts(self.train_prompts, c.prompts_per_iteration, iteration, c.seed, c.pool_size)

    def sample(self, iteration: int, prompts: Sequence[Prompt], stream: str = "train") -> list[Exchange]:
        """Step 2: K responses per prompt from the current policy pi_{t-1} (prompt-major).

        ``stream`` names the seed stream (``"validation"`` for ``top:K``'s batch).
        """
        k = self.config.samples_per_prompt
        ids = [encode_chat(self.tokenizer, p.text) for p in prompts for _ in range(k)]
        with self._bar(len(ids), f"iter {iteration}: sampling") as bar, self._policy():
            return generate_cached(  # pi_0's samples (iteration 1) are read back in runs that share them
                self.model,
                self.tokenizer,
                ids,
                self.generation,
                derive_seed(self.config.seed, stream, iteration),
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
                f"the oracle {oracle_name(self.oracle)!r} separated only {len(selection.pairs)} of "
                f"{selection.considered_prompts} prompts by more than margin={c.margin}; lower 'margin', raise "
                "'samples_per_prompt' or 'temperature', or use an oracle that distinguishes these responses"
            )
        label_samples(samples, selection)
        return selection

    def capture(
        self, iteration: int, selection: Selection, hooks: list[str], observed: Sequence[str] = ()
    ) -> PairActivations:
        """Step 5: the *base* model's activations of D+ and D- (never steered), in one forward pass per batch.

        Response tokens at the steered ``hooks`` (for the learner) and, per sample, their mean at the
        ``observed`` hooks (for analysis; a hook in both is captured once).
        """
        pairs = selection.pairs
        with self._bar(2 * len(pairs), f"iter {iteration}: capture") as bar:
            return capture_selected(
                self.model,
                self.tokenizer,
                pairs,
                hooks,
                iteration=iteration,
                observed=observed,
                batch_size=self.config.batch_size,
                on_batch=bar.update,
            )

    def fit(self, iteration: int, batch: Batch) -> SteeringSet:
        """Step 6: one steering function per hook from the learner, scaled by ``multiplier``."""
        return fit_steering(
            self.learner,
            batch.activations,
            reduction=self.config.reduction,
            multiplier=self.config.multiplier,
            positions=self.positions,
            model_name=str(getattr(self.model.cfg, "model_name", "")),
        )

    def evaluate(self, policy: SteeringSet | None) -> Evaluation:
        """Held-out samples of a policy (None: the base model), scored with no steering active.

        The judge stays fixed across iterations (for the self-judge: the base model), so held-out
        rewards of different iterations are comparable; during training the policy judges itself.
        Held-out evaluations only report: no choice of the loop reads them (see :meth:`validate`).
        """
        return self._evaluate_on(self.heldout_prompts, policy, heldout_seed(self.config.seed), self.reference)

    def validate(self, policy: SteeringSet | None) -> Evaluation:
        """:meth:`evaluate` on the validation prompts, with its own seed: what the guard rail judges."""
        return self._evaluate_on(self.validation_prompts, policy, derive_seed(self.config.seed, "validation"))

    def _evaluate_on(
        self, prompts: Sequence[Prompt], policy: SteeringSet | None, seed: int, reference: Any = None
    ) -> Evaluation:
        return evaluate(
            self.model,
            self.tokenizer,
            prompts,
            self.oracle,
            self.generation,
            steering=policy,
            samples_per_prompt=self.config.eval_samples_per_prompt,
            seed=seed,
            reference=reference,
        )

    def choose_layers(self) -> list[int]:
        """``layers = "top:K"``: the K layers whose D+ and D- a probe separates best, cross-validated by prompt.

        Chosen before the loop from a batch on the validation prompts (K samples each from
        iteration 1's policy, pi_0 or ``init``, on their own seed stream), captured at every layer:
        the choice never reads a training batch whose separability is then logged, nor a held-out
        prompt. The batch enters no memory bank.
        """
        k = int(str(self.config.layers).removeprefix("top:"))
        everything = list(range(self.n_layers))
        prompts = self.validation_prompts
        self._phase(0, "sample", prompts=prompts)
        samples = self.score(0, prompts, self.sample(0, prompts, stream="validation"))
        c = self.config
        selection = select_pairs(samples, pairs_per_prompt=c.pairs_per_prompt, margin=c.margin)
        prompt_ids = [pair.positive.prompt_id for pair in selection.pairs]
        if len(set(prompt_ids)) < 2:
            raise NotSeparableError(
                f"layers = {c.layers!r} needs pairs from at least 2 validation prompts to cross-validate probes; the "
                f"oracle separated {len(set(prompt_ids))} of {len(prompts)}. Raise 'validation_size' or "
                "'samples_per_prompt', or list the layers instead"
            )
        activations = self.capture(0, selection, self.config.hook_names(everything))
        pos, neg = activations.reduced("mean")
        accuracy = [
            probe_accuracy(pos[:, layer], neg[:, layer], activations.prompt_ids, seed=c.seed) for layer in everything
        ]
        return sorted(sorted(everything, key=lambda layer: (-accuracy[layer], layer))[:k])

    # -- helpers ------------------------------------------------------------------------------
    @property
    def _relative(self) -> dict[str, bool]:
        """Whether the oracle's (and the reference oracle's) scores only compare within a group."""
        return {"relative": is_relative(self.oracle), "relative_reference": is_relative(self.reference)}

    @property
    def positions(self) -> str:
        """The position policy of every fit: the config's, or for "auto" the learner's own default."""
        return learner_positions(self.learner, self.config.positions)

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
        self, iteration: int, oracle: Any, prompts: Sequence[Prompt], responses: list[list[str]], as_policy: bool
    ) -> list[list[float]]:
        """An oracle's scores, a few prompts at a time (with a progress bar); as the policy if asked."""
        step = max(1, nominal(self.config.batch_size) // self.config.samples_per_prompt)
        scores: list[list[float]] = []
        policy = self._policy() if as_policy else nullcontext()
        with (
            self._bar(len(prompts), f"iter {iteration}: scoring ({oracle_name(oracle)})", unit="prompt") as bar,
            policy,
        ):
            for start in range(0, len(prompts), step):
                texts = [p.text for p in prompts[start : start + step]]
                scores.extend(oracle.score(texts, responses[start : start + step]))
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


def sims_from_config(
    config: SimsConfig,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> Sims:
    """:meth:`Sims.from_config`: the run a configuration names (its model loaded unless given)."""
    return Sims.from_config(config, model=model, tokenizer=tokenizer, callbacks=callbacks, progress=progress, **kwargs)
