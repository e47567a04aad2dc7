"""The library face on the embedded model: README's example as printed, and ``fit_pairs`` against steering-vectors."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

import sims_lens
from sims_lens import fit_pairs
from sims_lens.chat import chat_text, encode_text
from tests.integration.test_equivalence import LAYERS, PAIRS, steering_vectors
from tests.unit.test_library import readme_example

pytestmark = pytest.mark.integration


def test_readme_example_runs_as_printed_on_the_embedded_model(embedded, monkeypatch):
    monkeypatch.setattr(sims_lens, "load_model", lambda *args, **kwargs: embedded)  # loaded once for the session
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md", "exec"), namespace)
    lines = out.getvalue().splitlines()
    rewards = [float(line.split()[1]) for line in lines[:3]]
    assert [int(line.split()[0]) for line in lines[:3]] == [1, 2, 3] and all(math.isfinite(r) for r in rewards)
    assert namespace["sims"].policy.hooks == ["blocks.15.hook_resid_post"] and len(lines[3]) > 10


def test_fit_pairs_last_token_equals_steering_vectors(embedded, hf_model):
    model, tok = embedded
    ours = fit_pairs(model, tok, PAIRS, learner="mean_diff", layers=LAYERS, reduction="last")
    texts = [(chat_text(tok, p) + chosen, chat_text(tok, p) + rejected) for p, chosen, rejected in PAIRS]
    for (pos, _), (prompt, chosen, _) in zip(texts, PAIRS, strict=True):  # the same tokens on both sides
        assert encode_text(tok, pos)[-1] == encode_text(tok, chosen)[-1], prompt
    theirs = steering_vectors.train_steering_vector(
        hf_model, tok, texts, layers=LAYERS, read_token_index=-1, aggregator=steering_vectors.mean_aggregator()
    )
    for layer in LAYERS:
        mine = ours.direction(f"blocks.{layer}.hook_resid_post")
        cos = torch.nn.functional.cosine_similarity(mine, theirs.layer_activations[layer].float(), dim=0).item()
        assert cos > 0.999, f"layer {layer}: cosine {cos}"
    ids = torch.tensor([encode_text(tok, chat_text(tok, "Tell me about the sea."))])
    with torch.no_grad():
        with theirs.apply(hf_model, multiplier=4.0):
            their_logits = hf_model(ids).logits
        with ours.scaled(4.0).apply(model):
            my_logits = model(ids)
        plain = model(ids)
    assert (my_logits - plain).abs().max() > 0.1  # the vectors do something
    diff = (my_logits - their_logits).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff}"
