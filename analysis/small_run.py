"""Make a small run folder when a notebook or script needs one and none is there yet.

``ensure_run(run_dir, model, tokenizer)`` returns ``run_dir`` unchanged if it already holds a
finished iteration, and otherwise runs (or resumes) a short SIMS run into it on the given model,
with the live analysis callback, exactly as ``sims-lens run`` would.
"""

from __future__ import annotations

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
    from sims_lens.loop import Sims
    from sims_lens.run_folder import RunFolder

    folder = RunFolder(run_dir)
    if folder.completed_iterations >= 1:
        return folder.path
    resume = folder.has_config()
    config = (
        folder.read_config() if resume else load_config(None, [*SMALL_RUN, *(SMOKE_RUN if smoke else []), *overrides])
    )
    sims = Sims.from_config(config, model=model, tokenizer=tokenizer, progress=progress, out=folder.path, resume=resume)
    sims.callbacks += live_callbacks(folder.path, sims.model, sims.tokenizer)
    print(f"making a small run in {folder.path} ({sims.config.iterations} iterations, layers {sims.config.layers}) ...")
    for result in sims.iterate():
        print(f"  iteration {result.iteration}: held-out reward {result.heldout.reward_mean:.3f}")
    return folder.path
