"""A short steering demonstration: learn one vector from contrast pairs, generate with and without.

The contrast pairs are the same prompts answered warmly and coldly; the vector is the mean
difference of the response-token activations (CAA) at one residual-stream layer.
"""

from __future__ import annotations

from sims_lens.capture import capture
from sims_lens.chat import Exchange, encode_chat, end_token_ids, response_ids_for_text
from sims_lens.generation import GenerationSettings, generate
from sims_lens.models import load_model
from sims_lens.steering.functions import SteeringSet
from sims_lens.steering.hooks import apply_steering
from sims_lens.steering.learners import make_learner

CONTRAST = [
    (
        "How was your day?",
        "It was wonderful, thank you! I loved every minute of it.",
        "It was awful. Nothing went right.",
    ),
    (
        "What do you think of rain?",
        "Rain is lovely and refreshing, I really enjoy it!",
        "Rain is miserable, cold and annoying.",
    ),
    (
        "Describe your neighbourhood.",
        "It is a friendly, cheerful place full of kind people.",
        "It is a dull, grim place full of noise.",
    ),
    (
        "How do you feel about Mondays?",
        "Mondays are a great fresh start, I am excited!",
        "Mondays are dreadful and exhausting.",
    ),
    (
        "Tell me about your job.",
        "I love my job, my colleagues are fantastic and kind.",
        "I hate my job, my colleagues are terrible.",
    ),
    (
        "What is winter like?",
        "Winter is cosy and magical, with happy evenings.",
        "Winter is bleak, dark and depressing.",
    ),
]
DEMO_PROMPTS = ["Describe a walk in the city.", "What do you think about cooking dinner?", "Tell me about the weather."]


def steering_demo(
    model_name: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    layer: int | None = None,
    multiplier: float = 2.0,
    max_new_tokens: int = 40,
) -> None:
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    layer = model.cfg.n_layers // 2 if layer is None else layer
    hook = f"blocks.{layer}.hook_resid_post"

    def exchanges(index: int) -> list[Exchange]:
        return [
            Exchange(tuple(encode_chat(tokenizer, p)), tuple(response_ids_for_text(tokenizer, pair[index])))
            for p, *pair in CONTRAST
        ]

    ends = end_token_ids(tokenizer)  # as in the loop: the end-of-turn token is not part of the response
    pos = capture(model, exchanges(0), [hook], tokenizer.pad_token_id, end_ids=ends)[:, 0]
    neg = capture(model, exchanges(1), [hook], tokenizer.pad_token_id, end_ids=ends)[:, 0]
    vector = make_learner("mean_diff").fit(pos, neg, hook)
    steering = SteeringSet.from_functions([vector.scaled(multiplier)])
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    base = generate(model, tokenizer, DEMO_PROMPTS, settings)
    with apply_steering(model, steering):
        steered = generate(model, tokenizer, DEMO_PROMPTS, settings)
    print(f"steering {hook} with a warm-minus-cold vector (norm {vector.direction.norm():.2f}) x {multiplier}\n")
    for prompt, b, s in zip(DEMO_PROMPTS, base, steered, strict=True):
        print(f"prompt:   {prompt}\nbase:     {b}\nsteered:  {s}\n")
