"""Make a small run folder when a notebook or script needs one and none is there yet.

``ensure_run(run_dir, model, tokenizer)`` returns ``run_dir`` unchanged if it already holds a
finished iteration, and otherwise runs (or resumes) a short SIMS run into it on the given model,
with the live analysis callback, exactly as ``sims-lens run`` would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SMALL_RUN = [
    "iterations=3",
    "prompts_per_iteration=12",
    "samples_per_prompt=4",
    "max_new_tokens=32",
    "layers=[9, 15, 21]",
    "multiplier=0.4",
    'update="accumulate"',
    'oracle="lexicon_sentiment"',
    "heldout_size=12",
]
"""Three layers (so the layer x layer geometry has something to show), scaled down per layer."""

SMOKE_RUN = [
    "iterations=2",
    "prompts_per_iteration=6",
    "samples_per_prompt=3",
    "max_new_tokens=12",
    "margin=0.0",
    "heldout_size=3",
    "eval_samples_per_prompt=1",
]
"""Applied on top of :data:`SMALL_RUN` for the notebook smoke tests."""


def completed_iterations(run_dir: str | Path) -> int:
    """The finished iterations ``state.json`` records (0 if none or no state)."""
    path = Path(run_dir) / "state.json"
    try:
        return int(json.loads(path.read_text()).get("completed_iterations", 0)) if path.is_file() else 0
    except (OSError, ValueError):
        return 0


def ensure_run(
    run_dir: str | Path,
    model: Any = None,
    tokenizer: Any = None,
    overrides: Sequence[str] = (),
    smoke: bool = False,
    progress: bool = False,
) -> Path:
    """``run_dir`` if it has a finished iteration; else run :data:`SMALL_RUN` (+ ``overrides``) into it."""
    from analysis.live import live_callbacks
    from sims_lens.config import load_config
    from sims_lens.run import RunWriter, prepare_folder, run_iterations, sims_from_config

    path = Path(run_dir)
    if completed_iterations(path) >= 1:
        return path
    resume = (path / "config.toml").is_file()
    config = None if resume else load_config(None, [*SMALL_RUN, *(SMOKE_RUN if smoke else []), *overrides])
    folder, config, done = prepare_folder(path, config, resume=resume)
    print(f"making a small run in {path} ({config.iterations} iterations, layers {config.layers}) ...")
    sims = sims_from_config(config, progress=progress, model=model, tokenizer=tokenizer)
    sims.callbacks = [RunWriter(folder, sims.model), *live_callbacks(path)]
    for result in run_iterations(sims, folder, done):
        reward = result.heldout.reward_mean if result.heldout is not None else float("nan")
        print(f"  iteration {result.iteration}: held-out reward {reward:.3f}")
    return path
