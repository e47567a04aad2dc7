"""sims-lens: self-improving model steering (SIMS) inside TransformerLens.

The library in one screen::

    from sims_lens import Sims, fit_pairs, load_model

    model, tokenizer = load_model()  # the embedded SmolLM2-135M-Instruct, a hub name, a folder or a .gguf
    sims = Sims(model, tokenizer, oracle="lexicon_sentiment", learner="mean_diff", layers=[15], iterations=3)
    for it in sims.iterate():
        print(it.iteration, it.heldout.reward_mean)
    with sims.policy.apply(model):
        ...  # generate steered

    steering = fit_pairs(model, tokenizer, [("prompt", "chosen answer", "rejected answer"), ...], layers=[15])

    from sims_lens.sweep import sweep  # a grid of whole runs, resumable, local or on Ray

    sweep("sweeps/learner_seed.toml", out="runs/learners").table()
"""

from sims_lens.config import SimsConfig, load_config
from sims_lens.fitting import fit_pairs
from sims_lens.generation import GenerationSettings, generate
from sims_lens.iteration import IterationResult
from sims_lens.loop import Sims
from sims_lens.models import load_model
from sims_lens.pairs import ContrastPair, load_pairs
from sims_lens.prompts import Prompt, load_prompts
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.hooks import apply_steering, attach
from sims_lens.steering.io import load_steering, save_steering
from sims_lens.tiny import tiny_model

__all__ = [
    "ContrastPair",
    "GenerationSettings",
    "IterationResult",
    "Prompt",
    "Sims",
    "SimsConfig",
    "SteeringFunction",
    "SteeringSet",
    "apply_steering",
    "attach",
    "fit_pairs",
    "generate",
    "load_config",
    "load_model",
    "load_pairs",
    "load_prompts",
    "load_steering",
    "save_steering",
    "tiny_model",
]
__version__ = "0.1.0"
