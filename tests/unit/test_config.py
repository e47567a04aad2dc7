"""Configuration: types, defaults, TOML round trip, seeds."""

from __future__ import annotations

import tomllib

import pytest

from sims_lens.config import ConfigError, config_from_dict, config_to_dict, load_config, to_toml
from sims_lens.seeds import derive_seed


@pytest.mark.parametrize(
    "override",
    [
        'contrast_sampling="no"',
        'temperature="hot"',
        "multiplier=nan",
        "seed=1.5",
        "iterations=true",
        "layers=[true, 3]",
        "learners=3",
        "contrast=5",
        'hook="hook_resid_mid"',
        'update="ema"\nupdate_rate=1.0',
    ],
)
def test_wrong_types_and_values_are_config_errors(override):
    with pytest.raises(ConfigError, match="is not allowed"):
        load_config(None, override.split("\n"))


def test_update_rate_defaults_depend_on_the_rule():
    assert load_config(None, ['update="ema"']).rate == 0.5
    assert load_config(None, ['update="accumulate"']).rate == 1.0
    assert load_config(None, ['update="ema"', "update_rate=0.2"]).rate == 0.2


def test_toml_round_trip_keeps_awkward_strings():
    config = load_config(None, ["oracles.self_judge.criterion='''Warmer?\nSay \"A\" or B \\\\ please'''"])
    text = to_toml(config_to_dict(config))
    assert config_from_dict(tomllib.loads(text)) == config
    assert "\n" in config.oracles["self_judge"]["criterion"]


def test_derived_seeds_do_not_collide_across_iterations_and_batches():
    seeds = {derive_seed(0, "train", it) for it in range(50)} | {derive_seed(0, "heldout")}
    assert len(seeds) == 51
    assert derive_seed(0, "batch", 16) != derive_seed(1, "batch", 0)
    assert derive_seed(3, "train", 1) == derive_seed(3, "train", 1)
