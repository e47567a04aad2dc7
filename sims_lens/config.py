"""Typed run configuration: dataclasses validated on construction, loadable from TOML and ``--set``.

Top-level keys are the stable names listed in ARCHITECTURE.md ("Configuration"): ``model``,
``iterations``, ``oracle``, ... Each oracle and learner keeps its own settings in a nested table
(``[oracles.self_judge]``, ``[learners.hpr]``); contrast sampling has ``[contrast]``. Renamed keys
keep working for a while, with a one-line note (:data:`RENAMED_KEYS`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from sims_lens.batching import is_batch_size
from sims_lens.capture import REDUCTIONS
from sims_lens.files import write_atomic
from sims_lens.update_rules import DEFAULT_RATE, UPDATE_RULES
from sims_lens.validation import ConfigError, check_field_types, rename_key
from sims_lens.validation import require as _check

RENAMED_KEYS = {"aggregation": "reduction"}
"""Old top-level key -> its current name."""

HOOK_SUFFIXES = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
"""Hook points a steering edit may write to. ``hook_resid_mid`` is left out on purpose: in
TransformerLens 4.3's bridge it aliases the MLP's layer-norm input, so an edit there would not
reach the residual stream."""


@dataclass
class ContrastConfig:
    """Contrast sampling (SIMS-CS): a memory bank of past samples, pairs by largest reward gap."""

    bank_size: int = 512
    max_pairs: int = 32

    def __post_init__(self) -> None:
        check_field_types(self, "contrast.")
        _check(self.bank_size >= 2, "contrast.bank_size", self.bank_size, "an integer >= 2")
        _check(self.max_pairs >= 2, "contrast.max_pairs", self.max_pairs, "an integer >= 2")


@dataclass
class SimsConfig:
    """Everything a SIMS run needs; ``config.toml`` in a run folder is this, resolved."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    """auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16 or float16; a run folder's
    config.toml records what auto became."""
    device: str = "auto"
    """auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; may change on resume."""
    prompts: str = "builtin"
    heldout_prompts: str = "builtin"
    heldout_size: int = 20
    validation_size: int = 8
    """Training prompts set aside (never trained on) for the choices the loop makes: the guard rail's
    perplexity check and ``layers = "top:K"``. Held-out prompts only report. Used only when the
    guard is on or layers is top:K; a fixed, seed-independent subset (see ``split_validation``)."""
    iterations: int = 3
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 0.95
    oracle: str = "lexicon_sentiment"
    reference_oracle: str = ""
    learner: str = "mean_diff"
    layers: list[int] | str = field(default_factory=lambda: [15])
    hook: str = "hook_resid_post"
    observe: list[int] | str = "all"
    """Layers whose D+ / D- activations are recorded every iteration for analysis, at ``hook``: "all"
    (every layer), a list of layer indices (or "3,15" text), or "none". Captured in the same forward
    pass as the steered layers, reduced to each sample's mean over its response tokens, and saved as
    ``observed/iter_NNN.safetensors``; steering and metrics do not depend on it."""
    multiplier: float = 1.0
    update: str = "accumulate"
    update_rate: float | None = None
    contrast_sampling: bool = False
    prompt_pool: int = 0
    """How many training prompts the iterations cycle through; 0 = automatic: every iteration draws
    N fresh prompts from all training prompts, except under contrast sampling, where the same N
    prompts come back every iteration (a prompt must recur for pairs across policies)."""
    seed: int = 0
    positions: str = "auto"
    """Which token positions the policy edits (all, generated, prompt, from:K); auto: the learner's
    own default (every position for the additive learners, generated tokens for HPR), recorded in
    a run folder's config.toml as what it became."""
    reduction: str = "mean"
    pairs_per_prompt: int = 1
    margin: float = 0.05
    max_perplexity_ratio: float = 3.0
    """The guard rail: a policy whose held-out perplexity under the base model exceeds this multiple
    of the base model's own is rejected (the previous policy is kept and the metrics flag it);
    0 turns the guard off."""
    init: str = ""
    """A ``.safetensors`` steering file the policy starts from (iteration 1 samples with it); "" starts
    from the base model pi_0. Held-out rewards are still compared with the unsteered base model."""
    on_rejected: str = "keep"
    """After a rejected policy: "keep" goes on from the previous policy, "stop" ends the run there."""
    eval_samples_per_prompt: int = 2
    batch_size: int | str = "auto"
    """Rows per forward in sampling, capture and NLL: a number, or "auto": fitted to the device's free
    memory and the work (:mod:`sims_lens.batching`; on the CPU at most 64 for sampling, 16 otherwise).
    An out-of-memory error halves the batch and retries it."""
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    oracles: dict[str, dict[str, Any]] = field(default_factory=dict)
    learners: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.contrast, dict):
            self.contrast = _build(ContrastConfig, self.contrast, "contrast")
        _check(isinstance(self.contrast, ContrastConfig), "contrast", self.contrast, "a table of settings")
        check_field_types(self)
        for key in ("oracles", "learners"):
            tables = getattr(self, key)
            _check(
                isinstance(tables, dict) and all(isinstance(v, dict) for v in tables.values()),
                key,
                tables,
                f"tables of settings, one per name ([{key}.NAME])",
            )
        if self.update_rate is None:
            self.update_rate = DEFAULT_RATE.get(self.update, 1.0)
        from sims_lens.models import DEVICE_FORMS, DEVICE_RE, DTYPE_NAMES
        from sims_lens.steering.positions import validate_policy

        _check(self.dtype in DTYPE_NAMES, "dtype", self.dtype, f"one of {', '.join(DTYPE_NAMES)}")
        _check(isinstance(self.device, str) and bool(DEVICE_RE.match(self.device)), "device", self.device, DEVICE_FORMS)
        for key in (
            "iterations",
            "prompts_per_iteration",
            "max_new_tokens",
            "heldout_size",
            "eval_samples_per_prompt",
            "pairs_per_prompt",
        ):
            value = getattr(self, key)
            _check(isinstance(value, int) and value >= 1, key, value, "an integer >= 1")
        _check(
            is_batch_size(self.batch_size),
            "batch_size",
            self.batch_size,
            'an integer >= 1 or "auto"',
        )
        _check(
            isinstance(self.samples_per_prompt, int) and self.samples_per_prompt >= 2,
            "samples_per_prompt",
            self.samples_per_prompt,
            "an integer >= 2 (the oracle compares K responses)",
        )
        _check(
            2 * self.pairs_per_prompt <= self.samples_per_prompt,
            "pairs_per_prompt",
            self.pairs_per_prompt,
            "at most samples_per_prompt / 2",
        )
        _check(self.temperature > 0, "temperature", self.temperature, "> 0 (SIMS samples K different responses)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(self.update in UPDATE_RULES, "update", self.update, f"one of {list(UPDATE_RULES)}")
        _check(0 < self.update_rate <= 1, "update_rate", self.update_rate, "a number in (0, 1]")
        _check(
            not (self.update == "ema" and self.update_rate == 1),
            "update_rate",
            self.update_rate,
            "a number in (0, 1) with update = 'ema' (1 would make it refit)",
        )
        _check(self.reduction in REDUCTIONS, "reduction", self.reduction, f"one of {list(REDUCTIONS)}")
        _check(self.margin >= 0, "margin", self.margin, "a number >= 0")
        _check(
            self.max_perplexity_ratio == 0 or self.max_perplexity_ratio > 1,
            "max_perplexity_ratio",
            self.max_perplexity_ratio,
            "a number > 1 (a multiple of the base model's perplexity), or 0 for no guard",
        )
        _check(
            isinstance(self.validation_size, int) and self.validation_size >= 0,
            "validation_size",
            self.validation_size,
            "an integer >= 0 (training prompts set aside for the guard rail and top:K)",
        )
        _check(self.on_rejected in ("keep", "stop"), "on_rejected", self.on_rejected, '"keep" or "stop"')
        _check(
            self.prompt_pool == 0 or self.prompt_pool >= self.prompts_per_iteration,
            "prompt_pool",
            self.prompt_pool,
            "0 (automatic) or a number of prompts >= prompts_per_iteration",
        )
        _check(self.multiplier != 0, "multiplier", self.multiplier, "a non-zero number")
        _check(self.hook in HOOK_SUFFIXES, "hook", self.hook, f"one of {list(HOOK_SUFFIXES)}")
        try:
            if self.positions != "auto":
                validate_policy(self.positions)
        except ValueError as err:
            raise ConfigError(f"positions: {err}") from None
        self.layers = parse_layers(self.layers)
        self.observe = parse_observe(self.observe)
        _check(
            self.validation_size >= 1 or not self.uses_validation,
            "validation_size",
            self.validation_size,
            "an integer >= 1 while the guard rail (max_perplexity_ratio) or layers = 'top:K' needs validation prompts",
        )

    @property
    def uses_validation(self) -> bool:
        """Whether the loop makes a choice on validation prompts (the guard rail, or top:K layers)."""
        return self.max_perplexity_ratio > 0 or str(self.layers).startswith("top:")

    @property
    def pool_size(self) -> int | None:
        """The size of the prompt pool iterations cycle through (None: fresh draws from all prompts)."""
        if self.prompt_pool:
            return self.prompt_pool
        return self.prompts_per_iteration if self.contrast_sampling else None

    @property
    def rate(self) -> float:
        """The update rate in force (``update_rate``, or the update rule's default)."""
        return DEFAULT_RATE[self.update] if self.update_rate is None else float(self.update_rate)

    def hook_names(self, layers: list[int]) -> list[str]:
        return [f"blocks.{layer}.{self.hook}" for layer in layers]

    def oracle_settings(self) -> dict[str, Any]:
        return dict(self.oracles.get(self.oracle, {}))

    def learner_settings(self) -> dict[str, Any]:
        return dict(self.learners.get(self.learner, {}))


def parse_layers(value: Any) -> list[int] | str:
    """``[3, 15]``, ``"all"``, ``"top:3"`` (best probe accuracy) or ``"3,15"``."""
    allowed = "a list of layer indices, 'all', or 'top:K' (the K layers with the best probe accuracy)"
    if isinstance(value, str):
        text = value.strip()
        if text == "all":
            return "all"
        if text.startswith("top:"):
            k = text[4:]
            _check(k.isdigit() and int(k) >= 1, "layers", value, allowed)
            return f"top:{int(k)}"
    return _layer_list(value, "layers", allowed)


def parse_observe(value: Any) -> list[int] | str:
    """``"all"``, ``"none"``, ``[3, 15]`` or ``"3,15"`` (an empty list is ``"none"``)."""
    allowed = "'all' (every layer), 'none', or a list of layer indices ([3, 15] or '3,15')"
    if isinstance(value, str) and value.strip() in ("all", "none"):
        return value.strip()
    if isinstance(value, list) and not value:
        return "none"
    return _layer_list(value, "observe", allowed)


def _layer_list(value: Any, key: str, allowed: str) -> list[int]:
    """A non-empty list of layer indices >= 0 (or its ``"3,15"`` text), sorted, without repeats."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip().strip("[]").split(",") if p.strip()]
        _check(bool(parts) and all(p.lstrip("-").isdigit() for p in parts), key, value, allowed)
        value = [int(p) for p in parts]
    _check(
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value),
        key,
        value,
        allowed,
    )
    return sorted(set(value))


def resolve_layers(layers: list[int] | str, n_layers: int) -> list[int] | None:
    """Concrete layers for a model; None for ``top:K`` (chosen from data in the first iteration)."""
    if layers == "all":
        return list(range(n_layers))
    if isinstance(layers, str):
        return None
    _check_in_range("layers", layers, n_layers)
    return list(layers)


def resolve_observe(observe: list[int] | str, n_layers: int) -> list[int]:
    """The observed layers of a model: every layer for ``"all"``, none for ``"none"``, else the list."""
    observe = parse_observe(observe)
    if observe == "all":
        return list(range(n_layers))
    if isinstance(observe, str):  # "none"
        return []
    _check_in_range("observe", observe, n_layers)
    return list(observe)


def _check_in_range(key: str, layers: list[int], n_layers: int) -> None:
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise ConfigError(
            f"{key}: {bad} out of range; the model has {n_layers} layers (0-{n_layers - 1}); choose {key} in that range"
        )


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"[{prefix}] " if prefix else ""
        raise ConfigError(f"unknown configuration key {where}{unknown[0]!r}; known keys: {sorted(known)}")
    return cls(**data)


def config_from_dict(data: dict[str, Any]) -> SimsConfig:
    """A validated configuration from a (TOML-shaped) dictionary; renamed keys are moved, with a note."""
    data = dict(data)
    for old, new in RENAMED_KEYS.items():
        rename_key(data, old, new)
    config: SimsConfig = _build(SimsConfig, data)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SimsConfig:
    """Read a TOML file (or the defaults) and apply ``key=value`` overrides (dotted for tables)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    for item in overrides or []:
        apply_override(data, item)
    return config_from_dict(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``key=value``; the value is read as TOML (numbers, booleans, lists), else as a string."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *parents, leaf = key.strip().split(".")
    target = data
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a table")
    target[leaf] = value


def config_to_dict(config: SimsConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_toml(data: dict[str, Any]) -> str:
    """TOML text for a configuration dictionary (``None`` values are left out: TOML has no null)."""
    return tomli_w.dumps(without_none(data))


def without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: without_none(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None}


def save_config(config: SimsConfig, path: str | Path) -> None:
    """Write ``config.toml`` whole or not at all (a resumed run rewrites it; a kill must not tear it)."""
    write_atomic(Path(path), to_toml(config_to_dict(config)))
