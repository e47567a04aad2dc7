"""Steering-function types, set operations and safetensors save/load."""

from __future__ import annotations

import json

import pytest
import torch

from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.io import load_steering, read_metadata, save_steering


def add_fn(hook: str, vector: torch.Tensor, **kw) -> SteeringFunction:
    return SteeringFunction("add", hook, {"vector": vector}, **kw)


def test_add_edit_and_multiplier():
    v = torch.tensor([1.0, 2.0, 3.0])
    h = torch.zeros(2, 4, 3)
    fn = add_fn("blocks.0.hook_resid_post", v, multiplier=2.0)
    torch.testing.assert_close(fn(h), (2 * v).expand(2, 4, 3))
    torch.testing.assert_close(fn(h, 0.5), v.expand(2, 4, 3))
    assert fn.layer == 0 and fn.d_model == 3


def test_ablate_add_removes_the_ablated_direction_at_multiplier_one():
    u = torch.tensor([1.0, 0.0, 0.0])
    v = torch.tensor([0.0, 1.0, 0.0])
    fn = SteeringFunction("ablate_add", "blocks.1.hook_resid_post", {"vector": v, "ablate": u})
    h = torch.tensor([[5.0, 2.0, 7.0]])
    torch.testing.assert_close(fn(h), torch.tensor([[0.0, 3.0, 7.0]]))
    torch.testing.assert_close(fn(h, 0.0), h)


def test_unknown_edit_and_missing_params_are_refused():
    with pytest.raises(ValueError, match="unknown steering edit"):
        SteeringFunction("warp", "blocks.0.hook_resid_post", {"vector": torch.ones(3)})
    with pytest.raises(ValueError, match="needs parameters"):
        SteeringFunction("add", "blocks.0.hook_resid_post", {})


def test_adding_sets_sums_vectors_exactly_and_chains_other_edits():
    a = SteeringSet.from_functions([add_fn("blocks.0.hook_resid_post", torch.ones(3), multiplier=2.0)])
    b = SteeringSet.from_functions(
        [add_fn("blocks.0.hook_resid_post", torch.arange(3.0)), add_fn("blocks.1.hook_resid_post", torch.ones(3))]
    )
    total = a + b
    assert len(total.functions["blocks.0.hook_resid_post"]) == 1
    h = torch.randn(2, 3)
    torch.testing.assert_close(
        total("blocks.0.hook_resid_post", h), b("blocks.0.hook_resid_post", a("blocks.0.hook_resid_post", h))
    )
    u = torch.tensor([1.0, 0.0, 0.0])
    c = SteeringSet.from_functions(
        [SteeringFunction("ablate_add", "blocks.0.hook_resid_post", {"vector": torch.ones(3), "ablate": u})]
    )
    chained = a + c
    assert [f.edit for f in chained.functions["blocks.0.hook_resid_post"]] == ["add", "ablate_add"]
    torch.testing.assert_close(
        chained("blocks.0.hook_resid_post", h), c("blocks.0.hook_resid_post", a("blocks.0.hook_resid_post", h))
    )


def test_scale_cosine_norms_and_to():
    a = SteeringSet.from_functions([add_fn("blocks.0.hook_resid_post", torch.tensor([1.0, 0.0]))])
    b = SteeringSet.from_functions([add_fn("blocks.0.hook_resid_post", torch.tensor([1.0, 1.0]))])
    assert a.cosine_similarity(b)["blocks.0.hook_resid_post"] == pytest.approx(2**-0.5)
    assert (3 * a).norms()["blocks.0.hook_resid_post"] == pytest.approx(3.0)
    assert a.to(dtype=torch.bfloat16).functions["blocks.0.hook_resid_post"][0].params["vector"].dtype == torch.bfloat16


def test_norm_matching_keeps_the_direction_at_the_references_length_per_hook():
    first = SteeringSet.from_functions(
        [
            add_fn("blocks.0.hook_resid_post", torch.tensor([3.0, 4.0])),
            add_fn("blocks.1.hook_resid_post", torch.ones(2)),
        ]
    )
    reference = SteeringSet.from_functions(
        [
            add_fn("blocks.0.hook_resid_post", torch.tensor([0.0, 10.0])),
            add_fn("blocks.1.hook_resid_post", torch.zeros(2)),
        ]
    )
    matched = first.norm_matched(reference)
    assert matched.norms() == pytest.approx({"blocks.0.hook_resid_post": 10.0, "blocks.1.hook_resid_post": 0.0})
    assert matched.cosine_similarity(first)["blocks.0.hook_resid_post"] == pytest.approx(1.0)
    grown = first.scaled(2.5)  # one shared direction, only the norm grows: matching gives it back
    torch.testing.assert_close(
        first.norm_matched(grown).direction("blocks.0.hook_resid_post"), grown.direction("blocks.0.hook_resid_post")
    )
    assert SteeringSet.from_functions([add_fn("blocks.0.hook_resid_post", torch.zeros(2))]).norm_matched(
        SteeringSet.from_functions([add_fn("blocks.0.hook_resid_post", torch.ones(2))])
    ).norms() == {"blocks.0.hook_resid_post": 0.0}  # nothing to rescale: it stays off
    with pytest.raises(ValueError, match="same hooks"):
        first.norm_matched(SteeringSet.from_functions([add_fn("blocks.0.hook_resid_post", torch.ones(2))]))
    ablating = SteeringSet.from_functions(
        [SteeringFunction("ablate_add", "blocks.0.hook_resid_post", {"vector": torch.ones(2), "ablate": torch.ones(2)})]
    )
    assert ablating.norm_matched(ablating).norms() == pytest.approx(ablating.norms())  # ablate_add adds too


def test_save_load_round_trip_with_metadata(tmp_path, tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    hpr_params = {
        "probe": torch.randn(64, generator=g),
        "mlp_w1": torch.randn(64, 8, generator=g),
        "mlp_b1": torch.zeros(8),
        "mlp_w2": torch.randn(8, 1, generator=g),
        "mlp_b2": torch.zeros(1),
    }
    steering = SteeringSet.from_functions(
        [
            add_fn(
                "blocks.0.hook_resid_post",
                torch.randn(64, generator=g),
                multiplier=0.5,
                learner="mean_diff",
                iteration=2,
            ),
            SteeringFunction("hpr", "blocks.1.hook_resid_post", hpr_params, learner="hpr", iteration=2),
        ],
        positions="generated",
        iteration=2,
    )
    path = save_steering(steering, tmp_path / "steering" / "iter_002.safetensors", model)
    loaded = load_steering(path, model)
    assert loaded.positions == "generated" and loaded.iteration == 2
    for hook in steering.functions:
        for fa, fb in zip(steering.functions[hook], loaded.functions[hook], strict=True):
            assert (fa.edit, fa.multiplier, fa.learner, fa.iteration) == (
                fb.edit,
                fb.multiplier,
                fb.learner,
                fb.iteration,
            )
            for name in fa.params:
                assert torch.equal(fa.params[name], fb.params[name])
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar == read_metadata(path)
    assert sidecar["d_model"] == 64 and sidecar["n_layers"] == 2
    assert {f["layer"] for f in sidecar["functions"]} == {0, 1}


def test_loading_refuses_a_mismatched_model(tmp_path, tiny):
    from sims_lens.tiny import tiny_model

    model, _ = tiny
    path = save_steering(
        SteeringSet.from_functions([add_fn("blocks.1.hook_resid_post", torch.ones(64))]),
        tmp_path / "s.safetensors",
        model,
    )
    wider, _ = tiny_model(n_layers=2, d_model=32)
    with pytest.raises(ValueError, match="d_model=64"):
        load_steering(path, wider)
    shallower, _ = tiny_model(n_layers=1, d_model=64)
    with pytest.raises(ValueError, match="2 layers"):
        load_steering(path, shallower)


def test_loading_bad_files_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_steering(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_steering(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(2)}, str(plain))
    with pytest.raises(ValueError, match="no sims-lens metadata"):
        load_steering(plain)
