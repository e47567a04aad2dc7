"""The prompt distribution D_q: the built-in prompt set and loaders for the user's own prompts.

SIMS needs prompts only, never answers. The built-in set (``sims_lens/data/prompts.jsonl``) holds
300 short, everyday user requests (advice, explanations, small creative tasks, opinions, plans,
how-tos, places, foods, hobbies, reflective questions) whose answers can be more or less warm, with
a fixed split: 240 ``train`` prompts for the loop and 60 ``heldout`` prompts that the loop never
sees, for evaluation.

:func:`load_prompts` reads the built-in set, a ``.jsonl`` / ``.csv`` / ``.txt`` file, or a Hugging
Face dataset (``hf:NAME[:SPLIT]``). Every problem with a source is a ``ValueError`` (or
``FileNotFoundError``) whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sims_lens.seeds import derive_seed

BUILTIN = "builtin"
GIVEN = "python:"
"""How a configuration names what was given to ``Sims`` as a Python object (a name cannot load it)."""
"""The source name of the built-in prompt set (``None`` means the same)."""
SPLITS = ("train", "heldout")
"""The splits of the built-in set; a file with a ``split`` column/field may use them too."""
EXTENSIONS = (".jsonl", ".csv", ".txt")
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Prompt:
    """One user prompt (raw text, not chat-formatted) and a stable id for the run's records."""

    id: str
    text: str


def builtin_path() -> Path:
    """The built-in prompt file shipped inside the package."""
    return Path(str(resources.files("sims_lens") / "data" / "prompts.jsonl"))


def load_prompts(
    source: str | os.PathLike[str] | None = None, split: str | None = None, *, column: str = "prompt"
) -> list[Prompt]:
    """Load a prompt set.

    ``source``: ``None`` or ``"builtin"`` for the built-in set; a path to a ``.jsonl`` file (one
    JSON object per line with a ``prompt`` field, or the field named by ``column``, and an
    optional ``id``), a ``.csv`` file (a ``prompt`` column, or ``column``; optional ``id``), or a
    ``.txt`` file (one prompt per non-empty line); or ``"hf:NAME[:SPLIT]"`` for a Hugging Face
    dataset (split ``train`` by default) read through ``datasets.load_dataset``.

    ``split``: ``"train"``, ``"heldout"`` or ``None`` (all). It selects rows by their ``split``
    field, which the built-in set has; a file without one can only be loaded with ``split=None``.

    Rows without an ``id`` get ``p0001``, ``p0002``, ... in file order.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)} or None for all prompts")
    if not isinstance(column, str) or not column:
        raise ValueError(f"column must be a non-empty string, got {column!r}")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str) and source.startswith(GIVEN):
        raise ValueError(
            f"prompts {source!r} were given as a Python list when the run was made and cannot be loaded by name; "
            "pass them again (Sims(..., prompts=[...])), or a prompt file (sims-lens eval --prompts FILE)"
        )
    if source is None or source == BUILTIN:
        return _from_records(_read_jsonl(builtin_path()), "prompt", split, "the built-in prompt set")
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"prompt source must be 'builtin', a file path or 'hf:NAME[:SPLIT]', got {source!r}")
    if source.startswith(HF_PREFIX):
        name, _, hf_split = source[len(HF_PREFIX) :].partition(":")
        return _from_records(_read_hf(name, hf_split or "train"), column, split, f"Hugging Face dataset {name!r}")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise ValueError(
            f"unsupported prompt file {str(path)!r} (extension {suffix or 'none'!r}); use a .jsonl, .csv or "
            "a .txt file (one prompt per line), 'builtin', or 'hf:NAME[:SPLIT]' for a Hugging Face dataset"
        )
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; pass an existing .jsonl, .csv or .txt file")
    where = f"prompt file {str(path)!r}"
    if suffix == ".txt":
        if split is not None:
            raise ValueError(f"{where} is a .txt file, which has no splits; load it with split=None")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        records = [{"prompt": line} for line in lines if line]
        return _from_records(records, "prompt", None, where)
    records = _read_jsonl(path) if suffix == ".jsonl" else _read_csv(path)
    return _from_records(records, column, split, where)


def sample_batch(prompts: Sequence[Prompt], n: int, rng: random.Random) -> list[Prompt]:
    """``n`` distinct prompts drawn without replacement (the whole set, shuffled, if ``n`` >= its size)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not prompts:
        raise ValueError("cannot sample from an empty prompt list")
    return rng.sample(list(prompts), min(n, len(prompts)))


def iteration_prompts(
    prompts: Sequence[Prompt], n: int, iteration: int, seed: int, pool_size: int | None = None
) -> list[Prompt]:
    """Iteration ``iteration``'s N training prompts (ARCHITECTURE.md, "The method", step 1).

    ``pool_size`` None: N prompts drawn afresh from all of ``prompts``. Otherwise a fixed pool of
    ``pool_size`` prompts (drawn once per seed) is revisited in rotation, N at a time, so each
    prompt comes back every ``pool_size / N`` iterations (every iteration when they are equal).
    """
    if pool_size is None:
        return sample_batch(prompts, n, random.Random(derive_seed(seed, "prompts", iteration)))
    if pool_size > len(prompts):
        raise ValueError(f"prompt_pool = {pool_size} but there are only {len(prompts)} training prompts")
    pool = sample_batch(prompts, pool_size, random.Random(derive_seed(seed, "prompt_pool")))
    start = ((iteration - 1) * n) % len(pool)
    return [pool[(start + i) % len(pool)] for i in range(min(n, len(pool)))]


def split_validation(prompts: Sequence[Prompt], size: int) -> tuple[list[Prompt], list[Prompt]]:
    """``(training, validation)``: ``size`` of ``prompts`` set aside for the loop's choices, the rest kept in order.

    The validation prompts are those whose text hashes lowest (SHA-256), so the split depends on
    neither the order of ``prompts`` nor the run's seed: every seed of a study validates on the same
    prompts, and they are never drawn for training.
    """
    if size <= 0:
        return list(prompts), []
    if size >= len(prompts):
        raise ValueError(
            f"validation_size = {size} but there are only {len(prompts)} training prompts; the loop needs some left "
            "to train on: lower validation_size or give more prompts"
        )
    ranked = sorted(prompts, key=lambda p: (hashlib.sha256(p.text.encode("utf-8")).hexdigest(), p.id))
    validation: list[Prompt] = []
    for prompt in ranked[:size]:
        if all(prompt.text != other.text for other in validation):
            validation.append(prompt)
    chosen = {p.text for p in validation}  # by text: a repeated prompt is never on both sides
    return [p for p in prompts if p.text not in chosen], validation


def read_records(
    source: str | os.PathLike[str], what: str = "prompt", example: str = '{"prompt": "..."}'
) -> tuple[list[dict[str, Any]], str]:
    """The rows of a ``.jsonl`` or ``.csv`` file, or of ``hf:NAME[:SPLIT]``, and how to name their source."""
    text = os.fspath(source)
    if text.startswith(HF_PREFIX):
        name, _, hf_split = text[len(HF_PREFIX) :].partition(":")
        return _read_hf(name, hf_split or "train"), f"Hugging Face dataset {name!r}"
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(
            f"unsupported {what} file {str(path)!r} (extension {suffix or 'none'!r}); use a .jsonl or .csv file, "
            "or 'hf:NAME[:SPLIT]' for a Hugging Face dataset"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist; pass an existing .jsonl or .csv file")
    records = _read_jsonl(path, what, example) if suffix == ".jsonl" else _read_csv(path)
    return records, f"{what} file {str(path)!r}"


def _read_jsonl(path: Path, what: str = "prompt", example: str = '{"prompt": "..."}') -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{what} file {str(path)!r}, line {number}: not valid JSON ({err.msg}); "
                f"each line must be one JSON object such as {example}"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{what} file {str(path)!r}, line {number}: expected a JSON object such as "
                f"{example}, got {type(record).__name__}"
            )
        records.append(record)
    return records


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return [dict(row) for row in csv.DictReader(handle)]


def _read_hf(name: str, split: str) -> list[dict[str, Any]]:
    if not name:
        raise ValueError("Hugging Face prompt source needs a dataset name: 'hf:NAME' or 'hf:NAME:SPLIT'")
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"loading the Hugging Face dataset {name!r} needs the package 'datasets' (pip install datasets); "
            "or pass a local .jsonl, .csv or .txt prompt file instead"
        ) from None
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"could not load the Hugging Face dataset {name!r} (split {split!r}): {type(err).__name__}: {first}. "
            "Without access to the hub (offline), pass a local .jsonl, .csv or .txt prompt file instead"
        ) from err
    return [dict(row) for row in data]


def _from_records(records: list[dict[str, Any]], column: str, split: str | None, where: str) -> list[Prompt]:
    if not records:
        raise ValueError(f"{where} holds no prompts; add at least one prompt")
    present = sorted({key for record in records for key in record})
    if not any(column in record for record in records):
        hint = "" if column == "prompt" else f" (column={column!r})"
        raise ValueError(
            f"{where} has no {column!r} column{hint}; columns present: {present}. "
            "Name the prompt column with column=..."
        )
    if split is not None and not any("split" in record for record in records):
        raise ValueError(f"{where} has no 'split' column, so split={split!r} cannot be selected; use split=None")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for index, record in enumerate(records, start=1):
        text = record.get(column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}, row {index}: the {column!r} value must be non-empty text, got {text!r}")
        row_split = record.get("split")
        if row_split is not None and row_split not in SPLITS:
            raise ValueError(f"{where}, row {index}: unknown split {row_split!r}; use one of {list(SPLITS)}")
        raw_id = record.get("id")
        pid = f"p{index:04d}" if raw_id is None or raw_id == "" else str(raw_id)
        if pid in seen:
            raise ValueError(f"{where}, row {index}: duplicate id {pid!r}; every prompt needs a distinct id")
        seen.add(pid)
        if split is None or row_split == split:
            prompts.append(Prompt(pid, text.strip()))
    if not prompts:
        raise ValueError(f"{where} has no prompts in split {split!r}")
    return prompts
