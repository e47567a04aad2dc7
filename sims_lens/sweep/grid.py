"""A sweep's grid: a base configuration crossed with lists of factor values, minus excluded cells.

A grid file (``GRID.toml``) is a run's ``config.toml`` keys (the base) plus a ``[factors]`` table that
maps each varied key to its list of values, and optional ``[[exclude]]`` tables::

    iterations = 3
    [factors]
    learner = ["mean_diff", "pca"]
    "learners.hpr.epochs" = [10, 20]      # a nested key, dotted and quoted
    seed = [0, 1, 2]                      # seeds are a factor like any other
    [[exclude]]
    learner = "pca"
    seed = [1, 2]                         # drops pca at seeds 1 and 2

``imports = ["my_oracles"]`` names modules every worker imports before it builds a cell, so oracles
and learners they register (``register_oracle``) can be named in the grid.

Every combination of the factor values is a :class:`Cell`; its name (``learner=pca,seed=0``) is made
from its values alone, so it is stable across re-runs and readable in a shell.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sims_lens.config import ContrastConfig, SimsConfig, config_from_dict, to_toml, without_none

SEED = "seed"
"""The factor whose cells :mod:`sims_lens.sweep` pools into intervals (and ``--eval`` into one evaluation)."""

MAX_NAME_BYTES = 200
"""The longest cell name (file systems allow 255 bytes per name; the log file adds a suffix)."""

NESTED_TABLES = {"oracles": 3, "learners": 3, "contrast": 2}
"""Configuration tables whose keys a factor may name dotted, and how many parts such a key has."""


class GridError(ValueError):
    """A grid file or grid table is malformed; the message names the key and the fix."""


@dataclass(frozen=True)
class Cell:
    """One combination of factor values: a run folder ``SWEEP_DIR/cells/NAME``."""

    name: str
    values: dict[str, Any]
    """Factor key -> this cell's value, in the grid's factor order."""

    def settings(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The cell's configuration table: ``base`` with each (dotted) factor key set to its value."""
        data = copy.deepcopy(dict(base))
        for key, value in self.values.items():
            *tables, leaf = key.split(".")
            target = data
            for table in tables:
                target = target.setdefault(table, {})
            target[leaf] = copy.deepcopy(value)
        return data

    def config(self, base: Mapping[str, Any]) -> SimsConfig:
        """The cell's validated configuration (a bad value raises :class:`~sims_lens.validation.ConfigError`)."""
        return config_from_dict(self.settings(base))

    @property
    def group(self) -> str:
        """The name of the cells that differ from this one only in seed (``all`` when seed is the only factor)."""
        return _name({k: v for k, v in self.values.items() if k != SEED}) or "all"


@dataclass
class Grid:
    """A base configuration, the factors crossed over it, and the combinations left out.

    Checked on construction: every key names a configuration key, every factor has a non-empty
    list of distinct values, every ``exclude`` entry names a factor and one of its values, and no
    two cells share a name. Values themselves are checked per cell, when it runs: a bad one fails
    that cell only.
    """

    base: dict[str, Any] = field(default_factory=dict)
    factors: dict[str, list[Any]] = field(default_factory=dict)
    exclude: list[dict[str, list[Any]]] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    """Modules imported before a cell is built (where the grid's own oracles and learners register)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.imports, list) and all(isinstance(m, str) and m for m in self.imports)):
            raise GridError(f"imports = {self.imports!r}: give a list of module names, e.g. imports = ['my_oracles']")
        if not isinstance(self.base, Mapping):
            raise GridError(f"the base configuration must be a table of config.toml keys, got {self.base!r}")
        self.base = without_none(_plain(dict(self.base)))
        for key in _flatten(self.base):
            _check_key(key, "the base configuration")
        if not isinstance(self.factors, Mapping) or not self.factors:
            raise GridError(
                "a grid needs a [factors] table: each varied key with its list of values, e.g. seed = [0, 1]"
            )
        self.factors = {k: _factor_values(k, values) for k, values in _flatten(_plain(dict(self.factors))).items()}
        overlap = sorted(set(self.factors) & set(_flatten(self.base)))
        if overlap:
            raise GridError(
                f"{overlap[0]!r} is both a base key and a factor; keep it in [factors] only (its values are the cells')"
            )
        if not isinstance(self.exclude, list):
            raise GridError("exclude must be a list of tables ([[exclude]] in TOML), each factor = value or [values]")
        self.exclude = [self._exclusion(table) for table in _plain(self.exclude)]
        names = [cell.name for cell in self.cells()]
        if not names:
            raise GridError("the [[exclude]] tables leave no cell to run; exclude fewer combinations")
        twins = sorted({n for n in names if names.count(n) > 1})
        if twins:
            raise GridError(f"two cells would share the folder name {twins[0]!r}; give the factor values distinct text")
        long = next((n for n in names if len(n.encode()) > MAX_NAME_BYTES), None)
        if long:
            raise GridError(
                f"the cell name {long[:60]}... is over {MAX_NAME_BYTES} bytes, too long for a folder; "
                "vary fewer keys per grid or give the values shorter text"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Grid:
        """A grid from a TOML-shaped table: base keys at the top, ``factors`` and ``exclude``."""
        data = dict(data)
        factors = data.pop("factors", {})
        exclude = data.pop("exclude", [])
        imports = data.pop("imports", [])
        return cls(base=data, factors=factors, exclude=exclude, imports=imports)

    def to_dict(self) -> dict[str, Any]:
        """The TOML-shaped table :meth:`from_dict` reads (what ``SWEEP_DIR/grid.toml`` holds)."""
        data: dict[str, Any] = {"imports": list(self.imports)} if self.imports else {}
        data.update(copy.deepcopy(self.base))
        data["factors"] = copy.deepcopy(self.factors)
        if self.exclude:
            data["exclude"] = copy.deepcopy(self.exclude)
        return data

    def to_toml(self) -> str:
        return to_toml(self.to_dict())

    def cells(self) -> list[Cell]:
        """Every combination of factor values not excluded, the first factor varying slowest."""
        keys = list(self.factors)
        cells = []
        for combo in itertools.product(*self.factors.values()):
            values = dict(zip(keys, combo, strict=True))
            if not any(all(values[k] in allowed for k, allowed in table.items()) for table in self.exclude):
                cells.append(Cell(_name(values), values))
        return cells

    def change_from(self, old: Grid) -> str | None:
        """One line naming how this grid differs from ``old`` (None: the same grid)."""
        if self.imports != old.imports:
            return f"imports changed: {_text(old.imports)} -> {_text(self.imports)}"
        if self.base != old.base:
            flat_new, flat_old = _flatten(self.base), _flatten(old.base)
            key = sorted(k for k in set(flat_new) | set(flat_old) if flat_new.get(k) != flat_old.get(k))[0]
            return f"the base key {key} changed: {_text(flat_old.get(key))} -> {_text(flat_new.get(key))}"
        if list(self.factors) != list(old.factors):
            return f"the factors changed: {list(old.factors)} -> {list(self.factors)}"
        for key, values in self.factors.items():
            if values != old.factors[key]:
                return f"factor {key} changed: {_text(old.factors[key])} -> {_text(values)}"
        if self.exclude != old.exclude:
            return f"the [[exclude]] tables changed: {_text(old.exclude)} -> {_text(self.exclude)}"
        return None

    def _exclusion(self, table: Any) -> dict[str, list[Any]]:
        if not isinstance(table, Mapping) or not table:
            raise GridError(f"an [[exclude]] table must map factors to values, got {table!r}")
        checked = {}
        for key, value in _flatten(dict(table)).items():
            if key not in self.factors:
                raise GridError(f"[[exclude]] names {key!r}, which is not a factor; use one of {list(self.factors)}")
            values = value if isinstance(value, list) else [value]
            unknown = [v for v in values if v not in self.factors[key]]
            if unknown:
                raise GridError(
                    f"[[exclude]] {key} = {_text(unknown[0])} is not one of the factor's values "
                    f"{_text(self.factors[key])}"
                )
            checked[key] = values
        return checked


def load_grid(path: str | os.PathLike[str]) -> Grid:
    """Read ``GRID.toml``; a missing or malformed file raises :class:`GridError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist; pass a TOML file with a [factors] table")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise GridError(f"grid file {path} is not valid TOML: {err}") from None
    try:
        return Grid.from_dict(data)
    except GridError as err:
        raise GridError(f"grid file {path}: {err}") from None


def _check_key(key: str, where: str) -> None:
    """A dotted key must name a configuration key (``learners.hpr.epochs``, ``contrast.bank_size``)."""
    parts = key.split(".")
    known = {f.name for f in dataclasses.fields(SimsConfig)}
    if parts[0] not in known:
        raise GridError(f"{where} names {key!r}, which is not a configuration key; known keys: {sorted(known)}")
    expected = NESTED_TABLES.get(parts[0], 1)
    if len(parts) != expected:
        shape = {1: key, 2: f"{parts[0]}.KEY", 3: f"{parts[0]}.NAME.KEY"}[expected]
        raise GridError(f"{where} names {key!r}; that key is written {shape}")
    if parts[0] == "contrast" and parts[1] not in {f.name for f in dataclasses.fields(ContrastConfig)}:
        raise GridError(f"{where} names {key!r}; [contrast] has {[f.name for f in dataclasses.fields(ContrastConfig)]}")


def _factor_values(key: str, values: Any) -> list[Any]:
    _check_key(key, "[factors]")
    if not isinstance(values, list) or not values:
        raise GridError(f"factor {key} = {_text(values)}: give a non-empty list of values, e.g. {key} = [a, b]")
    texts = [_text(v) for v in values]
    if len(set(texts)) != len(texts):
        raise GridError(f"factor {key} = {_text(values)} lists a value twice")
    return list(values)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys, down to a setting: ``{"learners": {"hpr": {"epochs": 1}}}`` ->
    ``{"learners.hpr.epochs": 1}``. Quoted dotted keys pass as they are; a setting's own table value stays whole."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name.count(".") + 1 < NESTED_TABLES.get(name.split(".")[0], 1):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _plain(value: Any) -> Any:
    """Tuples as lists, all the way down: a grid given from Python equals the one its TOML reads back as."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _slug(value: Any) -> str:
    """A value as folder-name text: ``[3, 15]`` -> ``3+15``, ``top:3`` -> ``top-3``, ``True`` -> ``true``."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list):
        text = "+".join(_slug(v) for v in value)
    elif isinstance(value, dict):
        text = _text(value)
    else:
        text = str(value)
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "empty"
    if len(slug) > 40:  # a long path or table: a readable start and a digest of the whole value
        slug = f"{slug[:32]}-{hashlib.sha1(_text(value).encode()).hexdigest()[:6]}"
    return slug


def _name(values: Mapping[str, Any]) -> str:
    return ",".join(f"{key}={_slug(value)}" for key, value in values.items())
