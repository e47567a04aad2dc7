"""``sims-lens eval``: every iteration's policy of one or more runs against baselines, with intervals.

All policies answer the same held-out prompts with the same sampling seed (paired samples):

- ``base``: the unsteered model; ``iter_001`` .. ``iter_T``: the run's policy after each iteration;
- ``prompting``: the base model with a system prompt asking for the target behaviour;
- ``best_of_k``: K base-model samples per answer, the training oracle keeps its favourite
  (K times the inference compute: ``samples_per_answer``);
- ``static_first``: iteration 1's fit alone, at its own norm (steering without iterating);
- ``static_all``: one fit on every applied pair of ``pairs.jsonl`` (:mod:`sims_lens.baselines`
  says why it is neither "the same data" nor norm-matched);
- ``static_first_matched``: iteration 1's fit rescaled, per layer, to the policy's norm: the
  iterated *direction* against the first one, with vector length held equal;
- ``fresh_pairs``: one fit on as many pairs as the run applied, all sampled from pi_0 on fresh
  training prompts, at the policy's norm: more data without self-improvement.
The two matched baselines are also made at each earlier iteration's norm (``NAME@iter_NNN``), and
``multipliers`` scales the last policy and both matched baselines (``NAMExM``): a reward-cost curve.

Metrics per response (ARCHITECTURE.md, "Evaluation against baselines"): ``reward`` (the training
oracle), ``reference_reward`` (an oracle not used for training), ``relevance`` (cosine of MiniLM
sentence embeddings of prompt and response), ``perplexity_under_base`` (token-weighted),
``kl_to_base`` (:mod:`sims_lens.kl`: log pi - log pi_0 summed over the response, on the policy's own
samples, full softmax at the sampling temperature without top-p; Best-of-K's is analytic),
``response_length``, ``distinct_2``, ``win_rate_vs_base`` (paired, training oracle) and
``samples_per_answer``. Each gets a 95% bootstrap interval over prompts, and over runs as well in the
pooled ``all`` rows; ``reward_change`` is each iteration's paired change from the one before, and
``differences.csv`` (:mod:`sims_lens.differences`) the paired differences against the baselines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sims_lens.answer_cache import generate_cached
from sims_lens.baselines import fit_on_pairs, fresh_pairs, pairs_applied_by, static_all
from sims_lens.chat import Exchange, encode_chat, end_token_ids
from sims_lens.config import SimsConfig
from sims_lens.differences import DIFFERENCE_METRICS, DIFFERENCES_FILE, is_iteration, paired_differences
from sims_lens.evaluation import response_nll
from sims_lens.generation import GenerationSettings, decode_response
from sims_lens.groups import chunked
from sims_lens.kl import best_of_k_kl, response_logprobs
from sims_lens.oracles import is_relative, make_oracle
from sims_lens.prompts import Prompt, load_prompts
from sims_lens.run_folder import RunFolder
from sims_lens.seeds import derive_seed
from sims_lens.stats import Estimate, bootstrap_ratio, distinct_n, paired_difference, win_outcomes
from sims_lens.steering.functions import SteeringSet
from sims_lens.steering.hooks import apply_steering

EVAL_COLUMNS = ["policy", "run", "seed", "metric", "value", "ci_low", "ci_high"]
BASELINES = ("prompting", "best_of_k", "static_first", "static_all", "static_first_matched", "fresh_pairs")
DEFAULT_SYSTEM_PROMPT = "Answer in a warm, positive, upbeat and encouraging tone."
"""The ``prompting`` baseline's system prompt; it suits the demo's sentiment goal (set your own)."""
EVAL_FILE = "eval.csv"
SAMPLES_FILE = "samples.jsonl"
RECORDED_METRICS = ("reward", "reference_reward", "relevance", "response_length", "distinct_2", "win", "kl_to_base")
"""The per-response values ``samples.jsonl`` keeps (with ``nll``)."""


@dataclass
class EvalSettings:
    """What ``sims-lens eval`` is asked for; None means "as the run was configured"."""

    prompts: str | None = None
    samples: int | None = None
    reference_oracle: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    n_boot: int = 2000
    multipliers: tuple[float, ...] = ()
    """Each also scales the last iteration's policy, ``static_first_matched`` and ``fresh_pairs``: ``NAMExM``."""

    def __post_init__(self) -> None:
        bad = [m for m in self.multipliers if not (isinstance(m, int | float) and m > 0 and np.isfinite(m))]
        if bad:
            raise ValueError(f"multipliers must be positive numbers, got {bad[0]!r}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples!r}")


@dataclass
class Answers:
    """One policy's answers to the held-out prompts: ``[prompt][sample]`` grids of per-response values."""

    policy: str
    responses: list[list[str]]
    exchanges: list[list[Exchange]]
    samples_per_answer: int = 1
    values: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-response metrics, each ``[n_prompts, n_samples]``: reward, nll, length, ..."""
    steering: SteeringSet | None = None
    """The steering the answers were sampled under (None: unsteered)."""
    system: str | None = None
    """The system instruction the answers were sampled with (``prompting``)."""


def evaluate_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    model: Any,
    tokenizer: Any,
    settings: EvalSettings,
    *,
    oracle: Any = None,
    relevance: Any = None,
) -> pd.DataFrame:
    """Evaluate every run's policies and the baselines; write ``eval.csv`` and ``samples.jsonl`` into ``out``.

    ``oracle`` (default: the runs' training oracle) and ``relevance`` (default: the ``relevance``
    oracle, prompt-response cosine with the packaged MiniLM) can be handed in.
    """
    folders = [RunFolder(path) for path in run_dirs]
    configs = [_check_run(folder) for folder in folders]
    _check_comparable(folders, configs)
    first = configs[0]
    prompts = load_prompts(settings.prompts) if settings.prompts is not None else folders[0].heldout_prompts(first)
    if oracle is None:
        oracle = make_oracle(first.oracle, first.oracle_settings(), model=model, tokenizer=tokenizer)
    reference_name = settings.reference_oracle if settings.reference_oracle is not None else first.reference_oracle
    reference = (
        make_oracle(reference_name, first.oracles.get(reference_name, {}), model=model, tokenizer=tokenizer)
        if reference_name
        else None
    )
    if relevance is None:
        relevance = make_oracle("relevance")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_run: dict[str, dict[str, Answers]] = {}
    records: list[dict[str, Any]] = []
    for folder, config in zip(folders, configs, strict=True):
        answers = _answer_all(folder, config, prompts, model, tokenizer, oracle, settings)
        for policy in answers.values():
            _score(policy, prompts, model, tokenizer, oracle, reference, relevance, config.temperature)
        _win_rates(answers, prompts, oracle)
        per_run[folder.path.name] = answers
        records += _records(folder.path.name, config.seed, prompts, answers)
    frame = _estimates(per_run, {f.path.name: c.seed for f, c in zip(folders, configs, strict=True)}, settings)
    frame.to_csv(out / EVAL_FILE, index=False)
    means = {run: _prompt_means(answers) for run, answers in per_run.items()}
    paired_differences(means, n_boot=settings.n_boot).to_csv(out / DIFFERENCES_FILE, index=False)
    (out / SAMPLES_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return frame


def _prompt_means(answers: dict[str, Answers]) -> dict[str, dict[str, np.ndarray]]:
    """``[policy][metric]``: each prompt's mean over its samples, for the paired differences."""
    return {
        name: {m: a.values[m].mean(axis=1) for m in DIFFERENCE_METRICS if m in a.values} for name, a in answers.items()
    }


# -- the policies -------------------------------------------------------------------------------
def _answer_all(
    folder: RunFolder,
    config: SimsConfig,
    prompts: Sequence[Prompt],
    model: Any,
    tokenizer: Any,
    oracle: Any,
    settings: EvalSettings,
) -> dict[str, Answers]:
    """Every policy's answers for one run: base, iterations, baselines, then the scaled policies."""
    samples = settings.samples or config.eval_samples_per_prompt
    generation = GenerationSettings(
        config.max_new_tokens,
        config.temperature,
        config.top_p,
        config.batch_size if config.batch_size == "auto" else max(int(config.batch_size), 32),
        True,
    )
    answer = _Answerer(model, tokenizer, prompts, samples, generation, derive_seed(config.seed, "eval"))
    out = {"base": answer("base", None)}
    iterations = folder.steering_iterations("policy")
    policies = {t: folder.load_steering(t, "policy", model) for t in iterations}
    for t, policy in policies.items():
        out[f"iter_{t:03d}"] = answer(f"iter_{t:03d}", policy)
    out["prompting"] = answer("prompting", None, system=settings.system_prompt)
    out["best_of_k"] = _best_of_k(answer, oracle, prompts, config.samples_per_prompt)
    first_fit = folder.load_steering(1, "fit", model)
    if first_fit is not None:
        out["static_first"] = answer("static_first", first_fit)
    static = static_all(folder, config, model, tokenizer)
    if static is not None:
        out["static_all"] = answer("static_all", static)
    matched = _norm_matched(folder, config, model, tokenizer, oracle, first_fit, policies, prompts)
    for name, steering in matched.items():
        same = next((a for a in out.values() if _same_steering(a.steering, steering)), None)
        out[name] = replace(same, policy=name, values={}) if same is not None else answer(name, steering)
    last = f"iter_{iterations[-1]:03d}"
    for multiplier in settings.multipliers:
        for name in (last, "static_first_matched", "fresh_pairs"):
            scaled = out[name].steering if name in out else None
            if scaled is not None:
                label = f"{name}x{multiplier:g}"
                out[label] = answer(label, scaled.scaled(multiplier))
    return out


def _norm_matched(
    folder: RunFolder,
    config: SimsConfig,
    model: Any,
    tokenizer: Any,
    oracle: Any,
    first_fit: SteeringSet | None,
    policies: dict[int, SteeringSet | None],
    prompts: Sequence[Prompt],
) -> dict[str, SteeringSet]:
    """``static_first_matched`` and ``fresh_pairs`` at each iteration's policy norm (``NAME@iter_NNN`` before the last).

    Only for additive edits (a rotation has no length to match) and policies on the fitted hooks
    alone (an ``init`` on other hooks has no fit to match). ``prompts`` are the evaluation's: the
    fresh pairs never use them.
    """
    last = max(policies)
    named = {t: (lambda name, t=t: name if t == last else f"{name}@iter_{t:03d}") for t in policies}
    additive = [p for p in [first_fit, *policies.values()] if p is not None]
    if first_fit is None or any(fn.edit not in ("add", "ablate_add") for p in additive for fn in p):
        return {}
    if any(set(p.functions) != set(first_fit.functions) for p in additive):
        return {}
    out = {named[t]("static_first_matched"): first_fit.norm_matched(p) for t, p in policies.items() if p is not None}
    counts = pairs_applied_by(folder, list(policies), tokenizer)
    pairs = fresh_pairs(folder, config, model, tokenizer, oracle, max(counts.values()), exclude=prompts)
    for t, policy in policies.items():
        n = min(counts[t], len(pairs))
        if policy is not None and n >= 2:
            out[named[t]("fresh_pairs")] = fit_on_pairs(pairs[:n], folder, config, model, tokenizer).norm_matched(
                policy
            )
    return out


def _same_steering(a: SteeringSet | None, b: SteeringSet | None) -> bool:
    """Whether two steering sets make the same edits (so their seeded answers are the same)."""
    if a is None or b is None or a.hooks != b.hooks or a.positions != b.positions:
        return False
    return all(
        len(fa) == len(fb)
        and all(
            x.edit == y.edit
            and x.multiplier == y.multiplier
            and x.params.keys() == y.params.keys()
            and all(torch.equal(x.params[k], y.params[k]) for k in x.params)
            for x, y in zip(fa, fb, strict=True)
        )
        for fa, fb in zip(a.functions.values(), b.functions.values(), strict=True)
    )


@dataclass
class _Answerer:
    model: Any
    tokenizer: Any
    prompts: Sequence[Prompt]
    samples: int
    generation: GenerationSettings
    seed: int

    def __call__(
        self, policy: str, steering: SteeringSet | None, system: str | None = None, repeats: int = 1, stream: str = ""
    ) -> Answers:
        """``samples * repeats`` answers per prompt, sampled with the shared seed (paired across policies)."""
        per_prompt = self.samples * repeats
        ids = [encode_chat(self.tokenizer, p.text, system) for p in self.prompts for _ in range(per_prompt)]
        active = apply_steering(self.model, steering) if steering is not None and len(steering) else nullcontext()
        with active:
            exchanges = generate_cached(  # the unsteered policies' answers are read back across runs
                self.model,
                self.tokenizer,
                ids,
                self.generation,
                derive_seed(self.seed, stream) if stream else self.seed,
            )
        responses = [decode_response(self.tokenizer, ex) for ex in exchanges]
        return Answers(
            policy, chunked(responses, per_prompt), chunked(exchanges, per_prompt), steering=steering, system=system
        )


def _best_of_k(answer: _Answerer, oracle: Any, prompts: Sequence[Prompt], k: int) -> Answers:
    """K base samples per answer; the oracle ranks each answer's K candidates and keeps its first choice."""
    pool = answer("best_of_k", None, repeats=k, stream="best_of_k")
    responses, exchanges = [], []
    for prompt, texts, exs in zip(prompts, pool.responses, pool.exchanges, strict=True):
        candidates = chunked(texts, k)
        scores = oracle.score([prompt.text] * len(candidates), candidates)
        best = [best_of_k_choice(s) for s in scores]
        responses.append([group[b] for group, b in zip(candidates, best, strict=True)])
        exchanges.append([group[b] for group, b in zip(chunked(exs, k), best, strict=True)])
    return Answers("best_of_k", responses, exchanges, samples_per_answer=k)


def best_of_k_choice(scores: Sequence[float]) -> int:
    """The candidate the oracle prefers (the first of tied best scores)."""
    return int(np.argmax(np.asarray(scores, dtype=float)))


# -- scoring ------------------------------------------------------------------------------------
def _score(
    answers: Answers,
    prompts: Sequence[Prompt],
    model: Any,
    tokenizer: Any,
    oracle: Any,
    reference: Any,
    relevance: Any,
    temperature: float,
) -> None:
    """Fill ``answers.values`` with every per-response metric."""
    texts = [p.text for p in prompts]
    flat = [ex for row in answers.exchanges for ex in row]
    shape = (len(prompts), len(answers.responses[0]))
    values = answers.values
    values["reward"] = np.asarray(oracle.score(texts, answers.responses), dtype=float)
    if is_relative(oracle):  # ranks within one group: their mean is not a reward level
        values["reward"] = np.full(shape, np.nan)
    if reference is not None and not is_relative(reference):
        values["reference_reward"] = np.asarray(reference.score(texts, answers.responses), dtype=float)
    values["relevance"] = np.asarray(relevance.score(texts, answers.responses), dtype=float)
    nll = response_nll(model, flat, int(tokenizer.pad_token_id))
    lengths = [len(ex.response_ids) for ex in flat]
    values["nll_sum"] = (np.asarray(nll) * np.asarray(lengths)).reshape(shape)
    values["tokens"] = np.asarray(lengths, dtype=float).reshape(shape)
    values["response_length"] = values["tokens"]
    ends = set(end_token_ids(tokenizer))
    content = [[t for t in ex.response_ids if t not in ends] for ex in flat]
    values["distinct_2"] = np.asarray([distinct_n(c, 2) for c in content]).reshape(shape)
    values["kl_to_base"] = _kl_to_base(answers, prompts, model, tokenizer, temperature).reshape(shape)


def _kl_to_base(
    answers: Answers, prompts: Sequence[Prompt], model: Any, tokenizer: Any, temperature: float
) -> np.ndarray:
    """Per response, ``log pi(y) - log pi_0(y)`` on the policy's own samples (:mod:`sims_lens.kl`).

    pi_0 scores the response after the plain prompt (``prompting``'s instruction removed). The base
    model's is 0; Best-of-K's is its analytic value, the same for every answer.
    """
    flat = [ex for row in answers.exchanges for ex in row]
    if answers.samples_per_answer > 1:
        return np.full(len(flat), best_of_k_kl(answers.samples_per_answer))
    if answers.steering is None and answers.system is None:
        return np.zeros(len(flat))
    pad = int(tokenizer.pad_token_id)
    policy = response_logprobs(model, flat, pad, temperature, steering=answers.steering)
    if answers.system is not None:
        plain = [tuple(encode_chat(tokenizer, p.text)) for p in prompts for _ in answers.exchanges[0]]
        flat = [Exchange(context, ex.response_ids) for context, ex in zip(plain, flat, strict=True)]
    return policy - response_logprobs(model, flat, pad, temperature)


def _win_rates(answers: dict[str, Answers], prompts: Sequence[Prompt], oracle: Any) -> None:
    """Per-response win indicator against the base answer with the same sample index (joint scoring)."""
    base = answers["base"]
    texts = [p.text for p in prompts]
    for name, policy in answers.items():
        if name == "base":
            continue
        s = len(base.responses[0])
        joint = oracle.score(texts, [b + p for b, p in zip(base.responses, policy.responses, strict=True)])
        scores = np.asarray(joint, dtype=float)
        policy.values["win"] = win_outcomes(scores[:, s:], scores[:, :s])


# -- estimates ------------------------------------------------------------------------------------
def _estimates(per_run: dict[str, dict[str, Answers]], seeds: dict[str, int], settings: EvalSettings) -> pd.DataFrame:
    """Tidy rows: one per (policy, run, metric), plus pooled ``all`` rows when several runs are given."""
    rows: list[dict[str, Any]] = []
    runs = list(per_run)
    policies = list(dict.fromkeys(name for answers in per_run.values() for name in answers))
    groups = [(run, [run]) for run in runs] + ([("all", runs)] if len(runs) > 1 else [])
    for label, members in groups:
        seed: Any = seeds.get(label, "")
        for policy in policies:
            if not all(policy in per_run[r] for r in members):
                continue
            stack = [per_run[r][policy] for r in members]
            for metric, estimate in _policy_estimates(stack, settings).items():
                rows.append(_row(policy, label, seed, metric, estimate))
        iterations = sorted(p for p in policies if is_iteration(p))
        for previous, current in zip(["base", *iterations], iterations, strict=False):
            for metric in ("reward", "reference_reward"):
                a = _per_prompt([per_run[r][current] for r in members], metric)
                b = _per_prompt([per_run[r][previous] for r in members], metric)
                if a is None or b is None or np.isnan(a).all():
                    continue
                estimate = paired_difference(a, b, n_boot=settings.n_boot, seed=derive_seed(0, label, current, metric))
                rows.append(_row(current, label, seed, f"{metric}_change", estimate))
    return pd.DataFrame(rows, columns=EVAL_COLUMNS)


def _policy_estimates(stack: list[Answers], settings: EvalSettings) -> dict[str, Estimate]:
    def boot(num: np.ndarray, den: np.ndarray | None = None, transform: Any = None, tag: str = "") -> Estimate:
        return bootstrap_ratio(
            num, den, transform=transform, n_boot=settings.n_boot, seed=derive_seed(0, stack[0].policy, tag)
        )

    out: dict[str, Estimate] = {}
    for metric in ("reward", "reference_reward", "relevance", "response_length", "distinct_2", "kl_to_base"):
        values = _per_prompt(stack, metric)
        if values is not None and not np.isnan(values).all():
            out[metric] = boot(values, tag=metric)
    nll, tokens = _per_prompt(stack, "nll_sum", total=True), _per_prompt(stack, "tokens", total=True)
    assert nll is not None and tokens is not None
    out["perplexity_under_base"] = boot(nll, tokens, transform=np.exp, tag="perplexity")
    wins = _per_prompt(stack, "win")
    if wins is not None:
        out["win_rate_vs_base"] = boot(wins, tag="win")
    k = float(stack[0].samples_per_answer)
    out["samples_per_answer"] = Estimate(k, k, k)
    return out


def _per_prompt(stack: list[Answers], metric: str, total: bool = False) -> np.ndarray | None:
    """``[n_runs, n_prompts]``: each prompt's mean (or sum) of a metric over its samples."""
    if any(metric not in a.values for a in stack):
        return None
    grids = [a.values[metric] for a in stack]
    return np.stack([g.sum(axis=1) if total else g.mean(axis=1) for g in grids])


def _row(policy: str, run: str, seed: Any, metric: str, estimate: Estimate) -> dict[str, Any]:
    return {
        "policy": policy,
        "run": run,
        "seed": seed,
        "metric": metric,
        "value": estimate.value,
        "ci_low": estimate.ci_low,
        "ci_high": estimate.ci_high,
    }


def _records(run: str, seed: int, prompts: Sequence[Prompt], answers: dict[str, Answers]) -> list[dict[str, Any]]:
    """``samples.jsonl``: every response with its scores."""
    out = []
    for name, policy in answers.items():
        for i, prompt in enumerate(prompts):
            for j, response in enumerate(policy.responses[i]):
                record: dict[str, Any] = {"policy": name, "run": run, "seed": seed, "prompt_id": prompt.id, "sample": j}
                record["response"] = response
                for metric in RECORDED_METRICS:
                    if metric in policy.values:
                        value = float(policy.values[metric][i, j])
                        record[metric] = None if np.isnan(value) else value
                record["nll"] = float(policy.values["nll_sum"][i, j] / max(policy.values["tokens"][i, j], 1.0))
                out.append(record)
    return out


# -- inputs -------------------------------------------------------------------------------------------
def _check_run(folder: RunFolder) -> SimsConfig:
    if not folder.path.is_dir():
        raise ValueError(f"run folder {folder.path} does not exist")
    config = folder.read_config()
    if not folder.steering_iterations("policy"):
        raise ValueError(f"{folder.path} has no finished iteration; run at least one before evaluating it")
    return config


def _check_comparable(folders: Sequence[RunFolder], configs: Sequence[SimsConfig]) -> None:
    """Runs pooled into one estimate must differ in their seed only (same model, oracle, prompts, settings)."""
    names = [f.path.name for f in folders]
    if len(set(names)) != len(names):
        raise ValueError(f"run folders must have different names to be told apart in eval.csv, got {names}")
    finished = [f.steering_iterations("policy") for f in folders]
    if any(done != finished[0] for done in finished[1:]):
        counts = ", ".join(f"{name}: {len(done)}" for name, done in zip(names, finished, strict=True))
        raise ValueError(
            f"runs pooled into one estimate must have finished the same iterations ({counts}); extend the "
            "shorter runs with sims-lens run --resume --set iterations=N, or evaluate them separately"
        )
    first = {k: v for k, v in vars(configs[0]).items() if k not in ("seed", "iterations")}
    for folder, config in zip(folders[1:], configs[1:], strict=True):
        other = {k: v for k, v in vars(config).items() if k not in ("seed", "iterations")}
        changed = sorted(k for k in first if first[k] != other[k])
        if changed:
            raise ValueError(
                f"{folder.path} differs from {folders[0].path} in {', '.join(changed)}; pool only runs that differ "
                "in their seed (evaluate the others separately)"
            )
