"""The plain twin: the bridge's weights without the bridge, running the bridge's residual hook points."""

from __future__ import annotations

import pytest
import torch

from sims_lens.chat import encode_chat
from sims_lens.generation import GenerationSettings, generate_ids
from sims_lens.plain_twin import hooked_forward, plain_twin
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.hooks import apply_steering

PROMPTS = ["Hi", "Tell me a story about the sea please", "What is 2+2?"]
RESIDUAL_SITES = [
    "hook_embed",
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_post",
    "blocks.0.hook_attn_out",
    "blocks.1.hook_mlp_out",
    "unembed.hook_out",
]


def identity(act, hook):
    return act


def test_twin_shares_the_bridges_tensors_and_honours_residual_sites(tiny):
    model, _ = tiny
    twin = plain_twin(model)
    assert twin is not None
    bridged = {t.data_ptr() for t in model.original_model.parameters()}
    assert {p.data_ptr() for p in twin.module.parameters()} <= bridged  # nothing copied
    for name in RESIDUAL_SITES:
        assert id(model.hook_dict[name]) in twin.sites, name
    assert id(model.hook_dict["blocks.0.attn.hook_pattern"]) not in twin.sites


def test_the_twin_is_used_only_where_every_active_hook_has_a_site(tiny):
    model, _ = tiny
    twin = plain_twin(model)
    with model.hooks(fwd_hooks=[(name, identity) for name in RESIDUAL_SITES]), hooked_forward(model) as lm:
        assert lm is twin.module
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", identity)]), hooked_forward(model) as lm:
        assert lm is model.original_model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in twin.module.modules())  # removed on exit


@pytest.mark.parametrize("policy", ["all", "generated", "from:3"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_steered_sampling_through_the_twin_equals_through_the_bridge(tiny, policy, temperature):
    model, tok = tiny
    g = torch.Generator().manual_seed(4)
    steering = SteeringSet.from_functions(
        [
            SteeringFunction("add", f"blocks.{layer}.hook_resid_post", {"vector": 2.0 * torch.randn(64, generator=g)})
            for layer in (0, 1)
        ]
    )
    ids = [encode_chat(tok, p) for p in PROMPTS for _ in range(2)]
    settings = GenerationSettings(max_new_tokens=8, temperature=temperature, batch_size=4)
    seen = []

    def record(act, hook):
        seen.append(act.shape[1])

    with apply_steering(model, steering, positions=policy):
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", record)]):
            twin = generate_ids(model, tok, ids, settings, seed=1)
        # a hook the twin cannot run (on the attention pattern) sends sampling through the bridge
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", identity)]):
            bridge = generate_ids(model, tok, ids, settings, seed=1)
    assert twin == bridge
    assert seen and seen[0] > 1  # the hooks ran in the twin's forwards: the prefill, then single tokens


def test_a_twin_first_built_under_steering_and_position_tracking_is_checked_without_them():
    """The check's forward must not meet the hooks already on the model (they expect another batch)."""
    import warnings

    from sims_lens.tiny import tiny_model

    model, tok = tiny_model(seed=3)  # a fresh bridge: no twin yet
    steering = SteeringSet.from_functions(
        [SteeringFunction("add", "blocks.1.hook_resid_post", {"vector": torch.ones(64)})]
    )
    ids = [encode_chat(tok, p) for p in PROMPTS]
    with warnings.catch_warnings(), apply_steering(model, steering, positions="generated"):
        warnings.simplefilter("error")  # "no plain twin" would be a warning
        out = generate_ids(model, tok, ids, GenerationSettings(max_new_tokens=4, batch_size=3))
    assert plain_twin(model) is not None and len(out) == 3
    assert not any(p._forward_hooks for p in model.hook_dict.values())  # put back, then removed by the context


def test_the_twin_is_checked_against_a_tolerance_that_fits_the_dtype(monkeypatch):
    """bfloat16: a faithful twin is accepted, one with a wrong norm is refused with its largest difference."""
    from sims_lens import plain_twin as twin_module
    from sims_lens.tiny import tiny_model

    assert twin_module.tolerance(torch.float32) == (1e-3, 1e-4)
    assert twin_module.tolerance(torch.bfloat16) == (0.0, 16 * 2**-7)
    model, _ = tiny_model(n_layers=2, d_model=64, seed=3, dtype=torch.bfloat16)
    verdict = twin_module.twin_verdict(model)
    assert verdict.used and verdict.largest_difference is not None and verdict.largest_difference <= verdict.tolerance

    build = twin_module._build

    def wrong_norms(bridge):
        twin = build(bridge)
        for module in twin.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = 10.0
        return twin

    monkeypatch.setattr(twin_module, "_build", wrong_norms)
    other, _ = tiny_model(n_layers=2, d_model=64, seed=3, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="differ from the bridge's by up to"):
        assert plain_twin(other) is None
    refused = twin_module.twin_verdict(other)
    assert not refused.used and refused.largest_difference > refused.tolerance


def test_info_says_whether_the_twin_is_used(tiny, monkeypatch, capsys):
    from sims_lens import cli, models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: tiny)
    assert cli.main(["info"]) == 0
    assert "plain twin   used for sampling, capture and NLL (largest logit difference" in capsys.readouterr().out


def test_a_bridge_and_its_twin_are_freed_together():
    """The twin is kept on the bridge, not in a module-level table that would keep every bridge alive."""
    import gc
    import weakref

    from sims_lens.tiny import tiny_model

    model, _ = tiny_model(n_layers=1, d_model=32, seed=4)
    assert plain_twin(model) is not None
    assert all(not name.startswith("_sims_lens") for name, _ in model.named_modules())  # not a submodule
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
