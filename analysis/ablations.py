"""Ablations of a learned policy: each steered layer alone, each layer left out, other multipliers.

Every variant is evaluated on the same held-out prompts with the same sampling seed as the base
model (paired samples), with :func:`sims_lens.evaluation.evaluate`, and reported next to it::

    table = ablate_run("runs/demo", model, tokenizer, multipliers=(0.5, 2.0))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sims_lens.evaluation import Evaluation, evaluate, head_to_head, heldout_seed
from sims_lens.generation import GenerationSettings
from sims_lens.prompts import Prompt
from sims_lens.run_folder import RunFolder
from sims_lens.steering.functions import SteeringSet, layer_of

COLUMNS = [
    "variant",
    "family",
    "layers",
    "multiplier",
    "reward_mean",
    "win_rate_vs_base",
    "perplexity_under_base",
    "response_length",
]


@dataclass(frozen=True)
class Variant:
    """One ablation: a name, its family (base / all / only / without / multiplier), what it steers."""

    name: str
    family: str
    steering: SteeringSet | None
    multiplier: float = 1.0

    @property
    def layers(self) -> str:
        if self.steering is None:
            return ""
        return ",".join(_label(h) for h in self.steering.functions)


def subset(steering: SteeringSet, hooks: Sequence[str]) -> SteeringSet:
    """The same steering set restricted to ``hooks`` (in the set's own order)."""
    keep = set(hooks)
    return dataclasses.replace(steering, functions={h: f for h, f in steering.functions.items() if h in keep})


def ablation_variants(steering: SteeringSet, multipliers: Sequence[float] = (0.5, 2.0)) -> list[Variant]:
    """Base, the full policy, each hook alone and each left out (if more than one), and scaled copies."""
    hooks = list(steering.functions)
    variants = [Variant("base", "base", None, 0.0), Variant("all", "all", steering)]
    if len(hooks) > 1:
        variants += [Variant(f"only {_name(h)}", "only", subset(steering, [h])) for h in hooks]
        variants += [
            Variant(f"without {_name(h)}", "without", subset(steering, [o for o in hooks if o != h])) for h in hooks
        ]
    variants += [
        Variant(f"all x{m:g}", "multiplier", steering.scaled(m), float(m)) for m in multipliers if float(m) != 1.0
    ]
    return variants


def ablate(
    model: Any,
    tokenizer: Any,
    steering: SteeringSet,
    prompts: Sequence[Prompt],
    oracle: Any,
    settings: GenerationSettings,
    multipliers: Sequence[float] = (0.5, 2.0),
    samples_per_prompt: int = 2,
    seed: int = 0,
) -> pd.DataFrame:
    """Evaluate every :func:`ablation_variants` variant; one row per variant (columns :data:`COLUMNS`)."""
    rows = []
    base: Evaluation | None = None
    for variant in ablation_variants(steering, multipliers):
        evaluation = evaluate(
            model,
            tokenizer,
            prompts,
            oracle,
            settings,
            steering=variant.steering,
            samples_per_prompt=samples_per_prompt,
            seed=seed,
        )
        if variant.family == "base":
            base = evaluation
        assert base is not None
        rows.append(
            {
                "variant": variant.name,
                "family": variant.family,
                "layers": variant.layers,
                "multiplier": variant.multiplier,
                "reward_mean": evaluation.reward_mean,
                "win_rate_vs_base": head_to_head(oracle, prompts, evaluation, base, samples_per_prompt),
                "perplexity_under_base": evaluation.perplexity,
                "response_length": evaluation.response_length,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def ablate_run(
    run_dir: str | Path,
    model: Any,
    tokenizer: Any,
    iteration: int | None = None,
    multipliers: Sequence[float] = (0.5, 2.0),
    heldout_size: int | None = None,
    samples_per_prompt: int | None = None,
    max_new_tokens: int | None = None,
    oracle: Any = None,
) -> pd.DataFrame:
    """:func:`ablate` the policy a run folder saved after ``iteration`` (default: the last one).

    Prompts, oracle, sampling settings and seed come from the run's ``config.toml`` (the seed of
    the loop's own held-out evaluation, so the ``base`` row repeats ``heldout_base.jsonl``); the
    keyword arguments shrink them for a quick look.
    """
    from sims_lens.oracles import make_oracle
    from sims_lens.prompts import load_prompts

    folder = RunFolder(run_dir)
    config = folder.read_config()
    iterations = folder.steering_iterations("policy")
    if not iterations:
        raise ValueError(f"{folder.path} has no finished iteration yet; run at least one")
    iteration = max(iterations) if iteration is None else iteration
    if iteration not in iterations:
        raise ValueError(f"{folder.path} has no steering for iteration {iteration}; it has {iterations}")
    steering = folder.load_steering(iteration, "policy", model)
    assert steering is not None
    source = config.heldout_prompts
    prompts = load_prompts(source, "heldout" if source == "builtin" else None)[: heldout_size or config.heldout_size]
    if oracle is None:
        oracle = make_oracle(config.oracle, config.oracle_settings(), model=model, tokenizer=tokenizer)
    settings = GenerationSettings(
        max_new_tokens or config.max_new_tokens, config.temperature, config.top_p, config.batch_size, True
    )
    return ablate(
        model,
        tokenizer,
        steering,
        prompts,
        oracle,
        settings,
        multipliers=multipliers,
        samples_per_prompt=samples_per_prompt or config.eval_samples_per_prompt,
        seed=heldout_seed(config.seed),
    )


def _label(hook: str) -> str:
    layer = layer_of(hook)
    return str(layer) if layer is not None else hook


def _name(hook: str) -> str:
    layer = layer_of(hook)
    return f"layer {layer}" if layer is not None else hook
