"""Exported policies on the embedded model: a re-imported control vector steers exactly as the original,
and steering-vectors and lm-eval's ``SteeredModel`` on the plain Hugging Face model match our hooks."""

from __future__ import annotations

import pytest
import torch

from sims_lens.chat import chat_text, encode_text
from sims_lens.steering.functions import SteeringFunction, SteeringSet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def policy(embedded):
    model, _ = embedded
    generator = torch.Generator().manual_seed(0)
    d_model = int(model.cfg.d_model)
    return SteeringSet.from_functions(
        [
            SteeringFunction(
                "add", f"blocks.{layer}.hook_resid_post", {"vector": torch.randn(d_model, generator=generator)}
            )
            for layer in (10, 20)
        ]
    )


def logits(model, ids, steering):
    with steering.apply(model):
        return model(ids, return_type="logits")


def test_a_reimported_control_vector_gives_the_same_steered_logits(embedded, policy, tmp_path):
    model, tok = embedded
    ids = torch.tensor([encode_text(tok, chat_text(tok, "Describe your morning."))])
    back = SteeringSet.from_gguf(policy.to_gguf(tmp_path / "policy.gguf", model), model)
    assert torch.equal(logits(model, ids, back), logits(model, ids, policy))


def test_peer_tools_on_the_hugging_face_model_match_our_hooks(embedded, hf_model, policy, tmp_path):
    pytest.importorskip("steering_vectors", reason="pip install --no-deps steering-vectors==0.12.2")
    model, tok = embedded
    ids = torch.tensor([encode_text(tok, chat_text(tok, "Describe your morning."))])
    ours = logits(model, ids, policy)
    with torch.no_grad(), policy.to_steering_vector(model).apply(hf_model):
        theirs = hf_model(input_ids=ids).logits
    assert torch.allclose(theirs, ours, atol=1e-4)
    hf_steered = pytest.importorskip("lm_eval.models.hf_steered", reason="pip install lm_eval==0.4.13")
    from sims_lens.models import cached_folder_for, embedded_gguf_path

    path = policy.to_lm_eval(tmp_path / "policy.pt", model)
    lm = hf_steered.SteeredModel(
        pretrained=str(cached_folder_for(embedded_gguf_path())), steer_path=str(path), device="cpu", dtype="float32"
    )
    assert sorted(lm.hook_to_steer) == ["layers.10", "layers.20"]
    with torch.no_grad():
        assert torch.allclose(lm._model_call(ids), ours, atol=1e-4)
