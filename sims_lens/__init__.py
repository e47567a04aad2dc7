"""sims-lens: self-improving model steering (SIMS) inside TransformerLens."""

from sims_lens.models import load_model
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.hooks import apply_steering, attach
from sims_lens.tiny import tiny_model

__all__ = ["SteeringFunction", "SteeringSet", "apply_steering", "attach", "load_model", "tiny_model"]
__version__ = "0.1.0"
