"""Equivalence with an independent implementation: David Chanin's ``steering-vectors``.

On the embedded model's Hugging Face module, ``steering-vectors`` trained with its mean aggregator
on the same contrastive pairs and token positions must give the same vectors as our ``mean_diff``,
and applying a vector through its ``apply()`` must give the same logits as through our hooks.
"""

from __future__ import annotations

import pytest
import torch

from sims_lens.capture import capture
from sims_lens.chat import Exchange, chat_text, encode_text
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.hooks import apply_steering
from sims_lens.steering.learners import make_learner

steering_vectors = pytest.importorskip(
    "steering_vectors", reason="install with: pip install --no-deps steering-vectors==0.12.2"
)

pytestmark = pytest.mark.integration

LAYERS = [3, 10, 15, 24]
PAIRS = [
    ("How was your day?", "It was wonderful, thank you!", "It was awful, nothing went right."),
    ("What do you think of rain?", "Rain is lovely and refreshing.", "Rain is miserable and cold."),
    ("Describe your street.", "A friendly, cheerful place.", "A dull, grim place."),
    ("How are Mondays?", "A great fresh start!", "Dreadful and exhausting."),
]


def texts(tok, index: int) -> list[str]:
    return [chat_text(tok, prompt) + pair[index] for prompt, *pair in PAIRS]


def test_mean_diff_matches_steering_vectors(embedded, hf_model):
    model, tok = embedded
    sv = steering_vectors.train_steering_vector(
        hf_model,
        tok,
        [(p, n) for p, n in zip(texts(tok, 0), texts(tok, 1), strict=True)],
        layers=LAYERS,
        read_token_index=-1,
        aggregator=steering_vectors.mean_aggregator(),
    )
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in LAYERS]

    def exchanges(index: int) -> list[Exchange]:
        out = []
        for text in texts(tok, index):
            ids = encode_text(tok, text)
            out.append(Exchange(tuple(ids[:-1]), tuple(ids[-1:])))  # the read position: the last token
        return out

    pos = capture(model, exchanges(0), hooks, tok.pad_token_id, reduction="last")
    neg = capture(model, exchanges(1), hooks, tok.pad_token_id, reduction="last")
    learner = make_learner("mean_diff")
    for i, (layer, hook) in enumerate(zip(LAYERS, hooks, strict=True)):
        ours = learner.fit(pos[:, i], neg[:, i], hook).direction
        theirs = sv.layer_activations[layer].float()
        cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=0).item()
        assert cos > 0.999, f"layer {layer}: cosine {cos}"


def test_applying_a_vector_gives_the_same_logits(embedded, hf_model):
    model, tok = embedded
    g = torch.Generator().manual_seed(0)
    vectors = {layer: 3.0 * torch.randn(model.cfg.d_model, generator=g) for layer in (5, 15)}
    sv = steering_vectors.SteeringVector(layer_activations=vectors, layer_type="decoder_block")
    ours = SteeringSet.from_functions(
        [SteeringFunction("add", f"blocks.{layer}.hook_resid_post", {"vector": v}) for layer, v in vectors.items()]
    )
    ids = torch.tensor([encode_text(tok, chat_text(tok, "Tell me about the sea."))])
    with torch.no_grad():
        with sv.apply(hf_model, multiplier=1.0):
            theirs = hf_model(ids).logits
        with apply_steering(model, ours):
            mine = model(ids)
        unsteered = model(ids)
    assert (mine - unsteered).abs().max() > 0.1  # the vector does something
    diff = (mine - theirs).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff}"


def test_steered_generation_differs_and_zero_vector_does_not(embedded):
    from sims_lens.generation import GenerationSettings, generate

    model, tok = embedded
    prompts = ["Tell me about the weather.", "Describe a walk in the city."]
    settings = GenerationSettings(max_new_tokens=20)
    base = generate(model, tok, prompts, settings)
    g = torch.Generator().manual_seed(1)
    vector = torch.randn(model.cfg.d_model, generator=g)
    vector = 60.0 * vector / vector.norm()
    steer = SteeringSet.from_functions([SteeringFunction("add", "blocks.15.hook_resid_post", {"vector": vector})])
    with apply_steering(model, steer):
        steered = generate(model, tok, prompts, settings)
    with apply_steering(model, steer, multiplier=0.0):
        zero = generate(model, tok, prompts, settings)
    assert steered != base
    assert zero == base
