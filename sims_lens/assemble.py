"""What a run is made of, from Python objects or names: configuration, oracle, learner, prompts, checks.

:class:`~sims_lens.loop.Sims` takes keyword settings, objects or registered names; this module turns
them into the parts the loop uses, and :func:`check_run` holds every check that needs more than one
setting (or the model, or the prompts), so each way into the loop (the CLI, notebooks, tests) runs
the same checks with the same messages. Nothing here changes the configuration it is given.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from sims_lens.config import SimsConfig, config_from_dict, resolve_layers, resolve_observe
from sims_lens.oracles.base import is_relative, make_oracle
from sims_lens.oracles.function import FunctionOracle, function_name
from sims_lens.prompts import BUILTIN, GIVEN, Prompt, load_prompts
from sims_lens.registry import Registry
from sims_lens.steering.functions import SteeringSet
from sims_lens.steering.hooks import check_hooks
from sims_lens.steering.io import check_compatible, load_steering, steering_metadata
from sims_lens.steering.learners import Learner, make_learner
from sims_lens.update_rules import DEFAULT_RATE
from sims_lens.validation import ConfigError

PromptSource = str | os.PathLike[str] | Sequence[str | Prompt] | None
"""Prompts as a list of strings or :class:`Prompt`, a file path, ``"builtin"`` or ``"hf:NAME[:SPLIT]"``."""


def build_config(config: SimsConfig | None, settings: Mapping[str, Any]) -> SimsConfig:
    """A new, validated configuration: ``config`` (or the defaults) with keyword ``settings`` on top.

    The keys and messages are the TOML keys' (an unknown key names the known ones); a nested
    table is a dict or its dataclass. ``config`` itself is never changed.
    """
    data: dict[str, Any] = {}
    if config is not None:
        data = {f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(config)}
        if (
            "update" in settings
            and "update_rate" not in settings
            and data["update_rate"] == DEFAULT_RATE.get(config.update, 1.0)
        ):
            data["update_rate"] = None  # the old rule's default rate: the new rule takes its own
    data.update(settings)
    return config_from_dict(data)


def resolve_oracle(
    spec: Any, config: SimsConfig, model: Any, tokenizer: Any, *, relative: bool | None = None, key: str = "oracle"
) -> Any:
    """An oracle from a registered name, an object with ``score``, or a callable ``f(prompts, responses)``.

    ``relative`` applies to a callable (default: absolute); an object declares ``relative`` itself.
    """
    if isinstance(spec, str):
        if relative is not None:
            raise ConfigError(
                f"oracle_relative = {relative} is not allowed with the registered {key} {spec!r}; it applies to plain "
                "functions (registered oracles declare whether they are relative)"
            )
        return make_oracle(check_not_marker(spec, key), config.oracles.get(spec, {}), model=model, tokenizer=tokenizer)
    if callable(getattr(spec, "score", None)):
        if relative is not None and relative != is_relative(spec):
            raise ConfigError(
                f"oracle_relative = {relative} contradicts the {key} object, whose 'relative' is {is_relative(spec)}; "
                "set 'relative' on the object itself (an object without it counts as absolute)"
            )
        return spec
    if callable(spec):
        return FunctionOracle(spec, relative=bool(relative))
    raise ConfigError(
        f"{key} = {spec!r} is not allowed; use a registered oracle name, an object with a score(prompts, responses) "
        "method, or a function f(prompts, responses) -> one list of scores per prompt"
    )


def oracle_name(oracle: Any) -> str:
    """The name a configuration records for an oracle object or function."""
    return str(getattr(oracle, "name", "") or function_name(getattr(oracle, "fn", oracle)))


def resolve_learner(spec: Any, config: SimsConfig) -> Learner:
    """A learner from its registered name (with its ``[learners.NAME]`` settings) or a learner object."""
    if spec is None or isinstance(spec, str):
        name = check_not_marker(config.learner if spec is None else spec, "learner")
        return make_learner(name, config.learners.get(name, {}))
    if callable(getattr(spec, "fit", None)) and hasattr(spec, "inputs"):
        return spec
    raise ConfigError(
        f"learner = {spec!r} is not allowed; use a registered learner name or an object with inputs and "
        "fit(pos, neg, hook) -> SteeringFunction"
    )


def resolve_prompts(source: PromptSource, split: str, key: str) -> list[Prompt]:
    """Prompts from a list of strings or :class:`Prompt`, a file, ``builtin`` (its ``split``) or ``hf:``.

    Strings get ids ``p0001, ...`` for training and ``h0001, ...`` for held-out prompts.
    """
    if source is None or isinstance(source, str | os.PathLike):
        source = BUILTIN if source is None else check_not_marker(os.fspath(source), key)
        return load_prompts(source, split if source == BUILTIN else None)
    if not isinstance(source, Sequence) or not source:
        raise ConfigError(
            f"{key}: got {source!r}; use a non-empty list of strings or Prompts, a file path or 'hf:NAME'"
        )
    prefix = "h" if split == "heldout" else "p"
    prompts = []
    for i, item in enumerate(source):
        if isinstance(item, Prompt) and item.text.strip():
            prompts.append(Prompt(item.id, item.text.strip()))  # as a prompt file is read (stripped)
        elif isinstance(item, str) and item.strip():
            prompts.append(Prompt(f"{prefix}{i + 1:04d}", item.strip()))
        else:
            raise ConfigError(f"{key}[{i}] = {item!r} is not allowed; use non-empty text or a Prompt")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ConfigError(
            f"{key}: prompt ids repeat ({sorted({i for i in ids if ids.count(i) > 1})[:3]}); give each its own"
        )
    return prompts


def given_marker(value: Any) -> str:
    """The configuration's record of prompts or a steering set given as objects: kind, size and a content hash.

    Runs given the same objects record the same text (their configurations still compare equal).
    """
    if isinstance(value, SteeringSet):
        digest = hashlib.sha256(json.dumps(steering_metadata(value), sort_keys=True).encode())
        for fn in value:
            for key in sorted(fn.params):
                digest.update(fn.params[key].detach().float().cpu().numpy().tobytes())
        return f"{GIVEN}steering set {digest.hexdigest()[:12]}"
    text = json.dumps([[p.id, p.text] for p in value])
    return f"{GIVEN}{len(value)} prompts {hashlib.sha256(text.encode()).hexdigest()[:12]}"


def part_record(
    part: Any, registry: Registry[Any], kind: str, relative: bool = False
) -> tuple[str, dict[str, Any] | None]:
    """How a configuration records an oracle or learner given as an object: its name and settings table.

    An object of a registered class whose settings are plain values is recorded as that class's
    name and settings (a configuration rebuilds it); anything else as ``python:KIND NAME``
    (``relative`` appended for a relative function oracle), which only Python can give again.
    """
    name = str(getattr(part, "name", "") or "")
    if name in registry and type(part) is registry.get(name) and dataclasses.is_dataclass(part):
        settings = {
            f.name: _plain(getattr(part, f.name))
            for f in dataclasses.fields(part)
            if f.init and f.name not in registry.resources and not f.name.startswith("_")
        }
        if all(_is_plain(v) for v in settings.values()):
            return name, settings
    return f"{GIVEN}{kind} {oracle_name(part)}{' relative' if relative else ''}", None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _is_plain(value: Any) -> bool:
    """A value TOML writes and reads back unchanged."""
    if isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def check_not_marker(source: str, key: str) -> str:
    """``source``, unless it records an object given in Python (which only Python can give again)."""
    if source.startswith(GIVEN):
        raise ConfigError(
            f"{key} = {source!r} was given as a Python object when the run was made; pass it again "
            f"(Sims(..., {key}=...)) or give a file instead"
        )
    return source


def check_run(
    config: SimsConfig,
    oracle: Any,
    train: Sequence[Prompt],
    heldout: Sequence[Prompt],
    n_layers: int,
    validation: Sequence[Prompt] = (),
) -> None:
    """Every check that joins settings with each other, the model or the prompts (one message each).

    ``train``: the prompts iterations draw from, once ``validation`` has been set aside.
    """
    resolve_layers(config.layers, n_layers)  # a layer the model lacks fails here, before any work
    resolve_observe(config.observe, n_layers)
    if not heldout:
        raise ConfigError("heldout_prompts: no held-out prompts; the loop measures every policy on them")
    if config.prompts == config.heldout_prompts and config.prompts != BUILTIN:
        raise ConfigError("prompts and heldout_prompts are the same file; evaluate on prompts the loop never trains on")
    shared = {p.text for p in [*train, *validation]} & {p.text for p in heldout}
    if shared:
        raise ConfigError(
            f"{len(shared)} held-out prompt(s) are also training prompts (e.g. {sorted(shared)[0]!r}); "
            "evaluate on prompts the loop never trains on"
        )
    if config.uses_validation and len(validation) < config.validation_size:
        raise ConfigError(
            f"validation_size = {config.validation_size} but there are only {len(train) + len(validation)} training "
            "prompts; the guard rail and top:K judge on prompts set aside from them and the loop needs some left: "
            "lower validation_size or give more prompts"
        )
    aside = f" once validation_size = {len(validation)} are set aside" if validation else ""
    if len(train) < config.prompts_per_iteration:
        raise ConfigError(
            f"prompts_per_iteration = {config.prompts_per_iteration} but there are only {len(train)} training "
            f"prompts{aside}; lower prompts_per_iteration{' or validation_size' if validation else ''} or give more "
            "prompts"
        )
    if config.pool_size is not None and config.pool_size > len(train):
        raise ConfigError(f"prompt_pool = {config.pool_size} but there are only {len(train)} training prompts{aside}")
    if config.contrast_sampling and is_relative(oracle):
        raise ConfigError(
            f"contrast_sampling compares rewards across iterations, but the oracle {oracle_name(oracle)!r} only ranks "
            "the responses of one prompt against each other (relative scores); turn contrast_sampling off or use an "
            "absolute oracle (lexicon_sentiment, reward_model, embedding_similarity, or a composite of them with "
            "normalize = 'none')"
        )


def prompt_lists(
    config: SimsConfig, given: Mapping[str, PromptSource], out: Any, resume: bool
) -> dict[str, list[Prompt]]:
    """Prompts given as lists, by key (``prompts``, ``heldout_prompts``); a resumed run made from lists
    reads its folder's copies."""
    from sims_lens.run_folder import RunFolder

    lists: dict[str, Any] = {
        key: value for key, value in given.items() if value is not None and not isinstance(value, str | os.PathLike)
    }
    for key in given:
        if key not in lists and str(getattr(config, key)).startswith(GIVEN) and out is not None and resume:
            lists[key] = RunFolder(out).load_prompts(key, config)
    splits = {"prompts": "train", "heldout_prompts": "heldout"}
    return {key: resolve_prompts(value, splits[key], key) for key, value in lists.items()}


def initial_policy(init: Any, model: Any, out: Any, resume: bool) -> SteeringSet | None:
    """The policy iteration 1 samples with: ``init`` (a SteeringSet or a steering file), else None (pi_0).

    A resumed run that has finished an iteration goes on from its own policy and reads no init; an
    init given as an object is read back from the run folder's copy.
    """
    from sims_lens.run_folder import RunFolder

    folder = RunFolder(out) if out is not None else None
    if folder is not None and resume and folder.state_path.is_file() and folder.completed_iterations:
        return None
    if init is None or init == "":
        return None
    if isinstance(init, str | os.PathLike):
        source = os.fspath(init)
        if source.startswith(GIVEN) and folder is not None and resume and folder.init_path.is_file():
            return load_steering(folder.init_path, model)
        return load_steering(check_not_marker(source, "init"), model)
    if not isinstance(init, SteeringSet):
        raise TypeError(f"init must be a SteeringSet or the path of a .safetensors steering file, got {type(init)}")
    check_hooks(model, init.hooks)
    check_compatible(steering_metadata(init, None), model, source="init")
    return init


def recorded_config(
    config: SimsConfig,
    model: Any,
    parts: Mapping[str, tuple[Any, Any]],
    given_prompts: Mapping[str, Sequence[Prompt]],
    init: Any,
    *,
    model_named: bool,
) -> SimsConfig:
    """The configuration config.toml records: what "auto" and each object given became.

    ``parts``: for ``oracle``, ``reference_oracle`` and ``learner``, (what was given, what it built).
    """
    from sims_lens.fitting import learner_positions
    from sims_lens.models import dtype_name
    from sims_lens.oracles.base import ORACLES
    from sims_lens.steering.learners import LEARNERS

    changes: dict[str, Any] = {
        "dtype": dtype_name(next(model.parameters()).dtype),
        "positions": learner_positions(parts["learner"][1], config.positions),
        **{key: given_marker(prompts) for key, prompts in given_prompts.items()},
    }
    loaded_as = getattr(model, "sims_lens_name", None)  # the name load_model was given
    if loaded_as:
        changes["model"] = loaded_as
    elif not model_named:
        changes["model"] = f"{GIVEN}model {getattr(model.cfg, 'model_name', '')}".strip()
    tables = {"oracles": copy.deepcopy(config.oracles), "learners": copy.deepcopy(config.learners)}
    for key, (spec, part) in parts.items():
        if spec is None or isinstance(spec, str):
            continue
        registry, table = (LEARNERS, "learners") if key == "learner" else (ORACLES, "oracles")
        kind = "learner" if key == "learner" else "oracle"
        name, settings = part_record(part, registry, kind, relative=key == "oracle" and is_relative(part))
        changes[key] = name
        if settings is not None:
            tables[table][name] = settings
    if init is not None and not isinstance(init, str | os.PathLike):
        changes["init"] = given_marker(init)
    return dataclasses.replace(config, **{**changes, **tables})
