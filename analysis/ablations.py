"""Ablations of a learned policy: each steered layer alone, each layer left out, other multipliers;
and a layer sweep: each *observed* layer steered alone with its own candidate direction.

Every variant is evaluated on the same held-out prompts with the same sampling seed as the base
model (paired samples), with :func:`sims_lens.evaluation.evaluate`, and reported next to it::

    table = ablate_run("runs/demo", model, tokenizer, multipliers=(0.5, 2.0))
    sweep = layer_sweep(model, tokenizer, "runs/demo")   # layer x (reward, perplexity, win rate) + separability

The sweep asks where the preference is *causally steerable* and puts it next to where it is
*linearly readable* (the layer's cross-validated separability): at every observed layer l the
candidate ``c_l = mean(H+_l) - mean(H-_l)`` of one iteration, rescaled to the norm of the run's
steered direction (so every layer gets the same push), is added at l's hook alone
(:func:`sweep_layers` is the part that needs no run folder).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from analysis.observed import SEPARABILITY_METRICS, candidates, load_observed, observed_iterations, separability_frame
from sims_lens.evaluation import Evaluation, evaluate, head_to_head, heldout_seed
from sims_lens.generation import GenerationSettings
from sims_lens.oracles.base import is_relative
from sims_lens.prompts import Prompt
from sims_lens.run_folder import RunFolder
from sims_lens.steering.functions import SteeringFunction, SteeringSet, layer_of

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
    prompts, oracle, settings = _run_setup(
        folder, config, model, tokenizer, heldout_size or config.heldout_size, max_new_tokens, oracle
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


SWEEP_COLUMNS = [
    "variant",
    "hook",
    "layer",
    "multiplier",
    "norm",
    "reward_mean",
    "win_rate_vs_base",
    "perplexity_under_base",
    "response_length",
    *SEPARABILITY_METRICS,
]
"""The layer sweep's table: one ``base`` row, then one row per (layer, multiplier)."""
SWEEP_PROMPTS = 8
"""Held-out prompts :func:`layer_sweep` evaluates by default (a sweep evaluates every layer)."""


def sweep_layers(
    model: Any,
    tokenizer: Any,
    directions: Mapping[str, Tensor],
    prompts: Sequence[Prompt],
    oracle: Any,
    settings: GenerationSettings,
    *,
    norm: float | None = None,
    multipliers: Sequence[float] = (1.0,),
    samples_per_prompt: int = 2,
    seed: int = 0,
    positions: str = "all",
    separability: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Steer each hook of ``directions`` alone and evaluate it against the base model (:data:`SWEEP_COLUMNS`).

    At hook h the edit is ``add`` with vector ``norm * unit(directions[h])`` (``norm`` None: the
    direction as it is) and multiplier ``m`` for each of ``multipliers``. Every variant samples the
    same ``prompts`` with the same ``seed`` as the base model (paired): ``win_rate_vs_base`` is
    :func:`~sims_lens.evaluation.head_to_head` against the base row, ``reward_mean`` is NaN for a
    relative oracle. A zero direction gives a row of NaN. ``separability`` (columns ``layer`` and
    :data:`~analysis.observed.SEPARABILITY_METRICS`) is joined on the layer.
    """
    relative = is_relative(oracle)

    def measure(steering: SteeringSet | None, base: Evaluation | None) -> tuple[Evaluation, dict[str, float]]:
        evaluation = evaluate(
            model,
            tokenizer,
            prompts,
            oracle,
            settings,
            steering=steering,
            samples_per_prompt=samples_per_prompt,
            seed=seed,
        )
        reference = base if base is not None else evaluation
        return evaluation, {
            "reward_mean": math.nan if relative else evaluation.reward_mean,
            "win_rate_vs_base": head_to_head(oracle, prompts, evaluation, reference, samples_per_prompt),
            "perplexity_under_base": evaluation.perplexity,
            "response_length": evaluation.response_length,
        }

    base, base_row = measure(None, None)
    rows: list[dict[str, Any]] = [
        {"variant": "base", "hook": "", "layer": math.nan, "multiplier": 0.0, "norm": 0.0, **base_row}
    ]
    model_name = str(getattr(getattr(model, "cfg", None), "model_name", ""))
    for hook, direction in directions.items():
        length = float(direction.float().norm())
        vector = direction.detach().float().cpu() * (norm / length if norm is not None and length > 0 else 1.0)
        for m in multipliers:
            row: dict[str, Any] = {
                "variant": f"{_name(hook)} x{float(m):g}",
                "hook": hook,
                "layer": layer_of(hook),
                "multiplier": float(m),
                "norm": float(vector.norm()) * abs(float(m)),
            }
            if length > 0:
                fn = SteeringFunction("add", hook, {"vector": vector}, multiplier=float(m), learner="layer_sweep")
                steering = SteeringSet.from_functions([fn], positions=positions, model_name=model_name)
                row.update(measure(steering, base)[1])
            rows.append(row)
    table = pd.DataFrame(rows).reindex(columns=[c for c in SWEEP_COLUMNS if c not in SEPARABILITY_METRICS])
    table["layer"] = pd.to_numeric(table["layer"], errors="coerce")
    if separability is not None and len(separability):
        joined = separability[["layer", *SEPARABILITY_METRICS]].drop_duplicates("layer", keep="last")
        table = table.merge(joined.astype({"layer": "float64"}), on="layer", how="left")
    return table.reindex(columns=SWEEP_COLUMNS)


def layer_sweep(
    model: Any,
    tokenizer: Any,
    run_dir: str | Path,
    iteration: int | None = None,
    layers: Iterable[int] | None = None,
    prompts: Sequence[Prompt] | None = None,
    multipliers: Sequence[float] | None = None,
    *,
    norm: float | None = None,
    heldout_size: int = SWEEP_PROMPTS,
    samples_per_prompt: int | None = None,
    max_new_tokens: int | None = None,
    oracle: Any = None,
) -> pd.DataFrame:
    """:func:`sweep_layers` over the observed layers of a run folder (:data:`SWEEP_COLUMNS`).

    The candidates ``mean(H+_l) - mean(H-_l)`` of ``iteration`` (default: the last one that kept
    its observed activations; runs made before every layer was observed have none: ValueError),
    restricted to ``layers`` (default: all observed), each rescaled to ``norm`` (default: the mean
    norm of the policy's steered directions after that iteration) and multiplied by each of
    ``multipliers`` (default ``(1.0,)``). For an ``hpr`` policy the steered "direction" is a probe
    normal, so pass ``norm`` yourself. Prompts (default: the run's first ``heldout_size`` held-out
    prompts), oracle, sampling settings, positions and the seed of the loop's own held-out
    evaluation come from ``config.toml``. Each layer's separability of that iteration comes from
    ``analysis_metrics.csv``, or is computed from the activations where it is missing there.
    """

    folder = RunFolder(run_dir)
    config = folder.read_config()
    available = observed_iterations(folder.path)
    if not available:
        raise ValueError(
            f"{folder.path} kept no observed activations (a run made before every layer was observed); "
            "the layer sweep needs them: make a new run"
        )
    iteration = max(available) if iteration is None else iteration
    observed = load_observed(folder.path, iteration) if iteration in available else None
    if observed is None:
        raise ValueError(f"{folder.path} has no observed activations for iteration {iteration}; it has {available}")
    wanted = None if layers is None else {int(layer) for layer in layers}
    vectors = candidates(observed)
    directions = {
        hook: vectors[i] for i, hook in enumerate(observed.observed_hooks) if wanted is None or layer_of(hook) in wanted
    }
    if not directions:
        raise ValueError(f"none of layers {sorted(wanted or [])} was observed; observed: {observed.observed_layers}")
    if norm is None:
        policy = folder.load_steering(iteration, "policy")
        norms = list(policy.norms().values()) if policy is not None else []
        if not norms:
            raise ValueError(f"{folder.path} has no policy for iteration {iteration}; pass norm=")
        norm = sum(norms) / len(norms)
    run_prompts, oracle, settings = _run_setup(folder, config, model, tokenizer, heldout_size, max_new_tokens, oracle)
    prompts = run_prompts if prompts is None else prompts
    return sweep_layers(
        model,
        tokenizer,
        directions,
        prompts,
        oracle,
        settings,
        norm=norm,
        multipliers=tuple(multipliers) if multipliers is not None else (1.0,),
        samples_per_prompt=samples_per_prompt or config.eval_samples_per_prompt,
        seed=heldout_seed(config.seed),
        positions=config.positions if config.positions != "auto" else "all",
        separability=_sweep_separability(folder, observed, iteration, int(config.seed)),
    )


def _sweep_separability(folder: RunFolder, observed: Any, iteration: int, seed: int) -> pd.DataFrame:
    """Per observed layer, its separability at ``iteration``: the live analysis rows, else computed now."""
    rows = folder.read_analysis_metrics()
    rows = rows[(rows["iteration"] == iteration) & rows["metric"].isin(SEPARABILITY_METRICS) & rows["layer"].notna()]
    table = rows.pivot_table(index="layer", columns="metric", values="value", aggfunc="last", dropna=False)
    layers = {float(layer) for layer in observed.observed_layers if layer is not None}
    if set(SEPARABILITY_METRICS) <= set(table.columns) and layers <= set(table.index):
        return table.reset_index()[["layer", *SEPARABILITY_METRICS]]
    return separability_frame(observed, seed)


def _label(hook: str) -> str:
    layer = layer_of(hook)
    return str(layer) if layer is not None else hook


def _name(hook: str) -> str:
    layer = layer_of(hook)
    return f"layer {layer}" if layer is not None else hook


def _run_setup(
    folder: RunFolder,
    config: Any,
    model: Any,
    tokenizer: Any,
    heldout_size: int,
    max_new_tokens: int | None,
    oracle: Any,
) -> tuple[list[Prompt], Any, GenerationSettings]:
    """A run's first ``heldout_size`` held-out prompts, its oracle (unless given) and its sampling settings."""
    from sims_lens.oracles import make_oracle

    prompts = folder.load_prompts("heldout_prompts", config)[:heldout_size]
    if oracle is None:
        oracle = make_oracle(config.oracle, config.oracle_settings(), model=model, tokenizer=tokenizer)
    settings = GenerationSettings(
        max_new_tokens or config.max_new_tokens, config.temperature, config.top_p, config.batch_size, True
    )
    return prompts, oracle, settings
