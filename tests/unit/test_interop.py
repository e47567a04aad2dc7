"""Policies in other tools' formats: llama.cpp control vectors (GGUF), steering-vectors, lm-eval's ``steered`` model.

Peer readers: the ``gguf`` package's own reader, repeng's ``ControlVector.import_gguf``, steering-vectors'
``SteeringVector.apply`` and lm-eval's ``SteeredModel``, each on the plain Hugging Face model.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from sims_lens.cli import main
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.gguf_vectors import FormatError
from sims_lens.steering.io import load_steering, save_steering

D = 64


def vectors(tiny4, hooks, seed=0, multiplier=1.5) -> SteeringSet:
    generator = torch.Generator().manual_seed(seed)
    scale = 0.5  # large enough to move the tiny model's logits, small enough to stay in range
    return SteeringSet.from_functions(
        [
            SteeringFunction(
                "add", hook, {"vector": scale * torch.randn(D, generator=generator)}, multiplier=multiplier
            )
            for hook in hooks
        ]
    )


def bridge_logits(model, ids, steering=None):
    if steering is None:
        return model(ids, return_type="logits")
    with steering.apply(model):
        return model(ids, return_type="logits")


@pytest.fixture(scope="module")
def plain_hf():
    """tiny4's weights as the plain Hugging Face model other tools load (the bridge rewires its own in place)."""
    from sims_lens.tiny import tiny_hf_model

    return tiny_hf_model(n_layers=4, d_model=D, seed=1)[0]


@pytest.fixture
def ids(tiny4):
    _, tok = tiny4
    return torch.tensor([tok.encode("Tell me a story about the sea")])


# -- GGUF ------------------------------------------------------------------------------------------


def test_a_control_vector_round_trips_and_steers_the_same(tiny4, tmp_path, ids):
    model, _ = tiny4
    steering = vectors(tiny4, ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"])
    path = steering.to_gguf(tmp_path / "v.gguf", model)
    back = SteeringSet.from_gguf(path, model)
    assert back.hooks == steering.hooks
    for hook in steering.hooks:  # the multiplier is folded in
        assert torch.equal(back.direction(hook), steering.direction(hook).float())
    steered, unsteered = bridge_logits(model, ids, back), bridge_logits(model, ids)
    assert torch.allclose(steered, bridge_logits(model, ids, steering), atol=1e-6)
    assert not torch.allclose(steered, unsteered, atol=1e-3)  # it does steer


def test_the_gguf_package_reads_what_llama_cpp_expects(tiny4, tmp_path):
    import gguf

    model, _ = tiny4
    steering = vectors(tiny4, ["blocks.2.hook_resid_post", "blocks.3.hook_resid_pre"])  # the second lands on block 2
    reader = gguf.GGUFReader(str(steering.to_gguf(tmp_path / "v.gguf", model)))
    field = reader.get_field("general.architecture")
    assert bytes(field.parts[-1]).decode() == "controlvector"
    assert bytes(reader.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    count = reader.get_field("controlvector.layer_count")
    assert count.types == [gguf.GGUFValueType.UINT32] and int(count.parts[-1][0]) == 1
    (tensor,) = reader.tensors
    assert (tensor.name, tensor.tensor_type, list(tensor.shape)) == ("direction.2", gguf.GGMLQuantizationType.F32, [D])
    expected = steering.direction("blocks.2.hook_resid_post") + steering.direction("blocks.3.hook_resid_pre")
    assert np.allclose(np.asarray(tensor.data), expected.numpy(), atol=1e-6)  # summed, as llama.cpp sums


def test_repeng_imports_the_same_directions(tiny4, tmp_path, monkeypatch):
    monkeypatch.setattr(np, "float_", np.float64, raising=False)  # repeng 0.4.0 predates NumPy 2
    extract = pytest.importorskip("repeng.extract", reason="pip install --no-deps repeng==0.4.0")
    model, _ = tiny4
    steering = vectors(tiny4, ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"])
    vector = extract.ControlVector.import_gguf(str(steering.to_gguf(tmp_path / "v.gguf", model)))
    assert vector.model_type == "llama" and sorted(vector.directions) == [1, 2]
    for layer in (1, 2):
        assert np.allclose(vector.directions[layer], steering.direction(f"blocks.{layer}.hook_resid_post").numpy())


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        (["blocks.0.hook_resid_post"], "output of block 0, which llama.cpp cannot steer"),
        (["blocks.1.hook_resid_pre"], "output of block 0, which llama.cpp cannot steer"),
        (["blocks.1.hook_mlp_out"], "adds to block outputs (the residual stream); blocks.1.hook_mlp_out is not one"),
    ],
)
def test_what_a_control_vector_cannot_hold_is_refused(tiny4, tmp_path, hooks, message):
    model, _ = tiny4
    with pytest.raises(FormatError, match=re.escape(message)):
        vectors(tiny4, hooks).to_gguf(tmp_path / "v.gguf", model)


def test_non_additive_edits_and_partial_positions_are_refused_for_every_format(tiny4, tmp_path):
    model, _ = tiny4
    base = vectors(tiny4, ["blocks.1.hook_resid_post"])
    ablate = SteeringSet.from_functions(
        [SteeringFunction("ablate_add", "blocks.1.hook_resid_post", {"vector": torch.ones(D), "ablate": torch.ones(D)})]
    )
    generated = SteeringSet(functions=base.functions, positions="generated")
    for export in (
        lambda s: s.to_gguf(tmp_path / "v.gguf", model),
        lambda s: s.to_lm_eval(tmp_path / "v.pt", model),
        lambda s: s.to_steering_vector(model),
    ):
        with pytest.raises(FormatError, match="'ablate_add' edits"):
            export(ablate)
        with pytest.raises(FormatError, match="edits 'generated' positions only"):
            export(generated)


def _write_gguf(path, architecture="controlvector", tensors=None, layer_count=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_string(f"{architecture}.model_hint", "llama")
    tensors = tensors if tensors is not None else {"direction.1": np.zeros(D, np.float32)}
    writer.add_uint32(f"{architecture}.layer_count", len(tensors) if layer_count is None else layer_count)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"not a gguf at all"), "is not a GGUF file"),
        (lambda p: _write_gguf(p, architecture="llama"), "architecture 'llama', not a control vector"),
        (lambda p: _write_gguf(p, tensors={"direction.1": np.zeros(D + 1, np.float32)}), "has 65 values"),
        (lambda p: _write_gguf(p, tensors={"direction.1": np.zeros(D, np.float16)}), "is F16, but control vectors"),
        (lambda p: _write_gguf(p, layer_count=3), "says layer_count = 3 but holds 1 direction tensors"),
        (lambda p: _write_gguf(p, tensors={"direction.4": np.zeros(D, np.float32)}), "cannot steer (1-3)"),
        (lambda p: _write_gguf(p, tensors={}), "holds no direction tensors"),
    ],
)
def test_bad_control_vector_files_get_one_line_naming_the_file(tiny4, tmp_path, make, message):
    model, _ = tiny4
    path = tmp_path / "bad.gguf"
    make(path)
    with pytest.raises(FormatError, match=re.escape(message)) as err:
        SteeringSet.from_gguf(path, model)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_or_hostile_files_fail_with_one_line_and_never_hang(tiny4, tmp_path):
    model, _ = tiny4
    whole = vectors(tiny4, ["blocks.1.hook_resid_post"]).to_gguf(tmp_path / "v.gguf", model).read_bytes()
    cut = tmp_path / "cut.gguf"
    for length in range(4, len(whole), 7):  # every part of the header and the tensor data
        cut.write_bytes(whole[:length])
        with pytest.raises(FormatError, match=str(cut)):
            SteeringSet.from_gguf(cut, model)
    hostile = tmp_path / "hostile.gguf"  # one key: an array claiming 2^40 uint8 values, then the end
    key = b"x"
    header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    entry = len(key).to_bytes(8, "little") + key + (9).to_bytes(4, "little") + (0).to_bytes(4, "little")
    hostile.write_bytes(header + entry + (1 << 40).to_bytes(8, "little"))
    with pytest.raises(FormatError, match="cut short or corrupt"):
        SteeringSet.from_gguf(hostile, model)
    nameless = tmp_path / "nameless.gguf"
    nameless.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") * 2)
    with pytest.raises(FormatError, match=r"has no general\.architecture key"):
        SteeringSet.from_gguf(nameless, model)


def test_a_vector_made_for_another_architecture_comes_with_a_warning(tiny4, tmp_path):
    model, _ = tiny4
    import gguf

    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "qwen2")
    writer.add_uint32("controlvector.layer_count", 1)
    writer.add_tensor("direction.1", np.ones(D, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.warns(UserWarning, match="made for a 'qwen2' model; this model is 'llama'"):
        SteeringSet.from_gguf(path, model)


def test_an_empty_set_is_refused(tiny4, tmp_path):
    model, _ = tiny4
    with pytest.raises(FormatError, match="this steering set is empty"):
        SteeringSet().to_gguf(tmp_path / "v.gguf", model)


def test_repeng_steers_the_hugging_face_model_as_the_exported_layers_say(tiny4, plain_hf, tmp_path, ids, monkeypatch):
    """An independent check of the layer numbering: repeng's ControlModel adds ``direction.k`` to the output of
    ``layers[k]``, as llama.cpp does; the same vectors at our ``blocks.k.hook_resid_post`` give the same logits."""
    monkeypatch.setattr(np, "float_", np.float64, raising=False)
    repeng = pytest.importorskip("repeng", reason="pip install --no-deps repeng==0.4.0")
    model, _ = tiny4
    steering = vectors(tiny4, ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"])
    vector = repeng.ControlVector.import_gguf(str(steering.to_gguf(tmp_path / "v.gguf", model)))
    controlled = repeng.ControlModel(plain_hf, layer_ids=sorted(vector.directions))
    try:
        controlled.set_control(vector, coeff=1.0)
        theirs = controlled(input_ids=ids).logits
    finally:
        controlled.unwrap()
    assert torch.allclose(theirs, bridge_logits(model, ids, steering), atol=1e-4)


# -- steering-vectors ------------------------------------------------------------------------------


def test_steering_vectors_patches_the_hugging_face_model_as_our_hooks_do(tiny4, plain_hf, ids):
    pytest.importorskip("steering_vectors", reason="pip install --no-deps steering-vectors==0.12.2")
    model, _ = tiny4
    for hooks in (
        ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"],
        ["blocks.0.hook_mlp_out", "blocks.2.hook_mlp_out"],
        ["blocks.1.hook_attn_out"],
    ):
        steering = vectors(tiny4, hooks)
        vector = steering.to_steering_vector(model)
        with vector.apply(plain_hf):
            theirs = plain_hf(input_ids=ids).logits
        assert torch.allclose(theirs, bridge_logits(model, ids, steering), atol=1e-4), hooks
        back = SteeringSet.from_steering_vector(vector, model)
        assert back.hooks == steering.hooks
        assert all(torch.allclose(back.direction(h), steering.direction(h)) for h in hooks)


def test_a_steering_vector_holds_one_kind_of_hook_point_of_the_models_width(tiny4):
    SteeringVector = pytest.importorskip("steering_vectors").SteeringVector

    model, _ = tiny4
    with pytest.raises(FormatError, match=r"layer 1 has shape \[1, 64\]; this model needs \[64\]"):
        SteeringSet.from_steering_vector(SteeringVector({1: torch.ones(1, D)}), model)
    with pytest.raises(FormatError, match="one layer type, but this policy steers"):
        vectors(tiny4, ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]).to_steering_vector(model)


# -- lm-evaluation-harness -------------------------------------------------------------------------


def test_lm_eval_steered_model_loads_the_file_and_steers_each_layer_with_its_own_vector(tiny4, tmp_path, ids):
    """lm-eval's own ``SteeredModel`` (``--model steered``) on the plain Hugging Face folder: three hook
    points, so a hook that got another's vector (late binding in a loop) would show."""
    hf_steered = pytest.importorskip("lm_eval.models.hf_steered", reason="pip install lm_eval==0.4.13")
    from sims_lens.tiny import tiny_hf_model

    model, _ = tiny4
    hf, tok = tiny_hf_model(n_layers=4, d_model=D, seed=1)  # tiny4's weights, as a folder lm-eval loads
    hf.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    steering = vectors(tiny4, ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.3.hook_resid_pre"])
    path = steering.to_lm_eval(tmp_path / "v.pt", model)
    assert sorted(torch.load(path, weights_only=True)) == ["layers.1", "layers.2", "layers.2.mlp"]
    lm = hf_steered.SteeredModel(pretrained=str(tmp_path / "tiny"), steer_path=str(path), device="cpu", dtype="float32")
    assert sorted(lm.hook_to_steer) == ["layers.1", "layers.2", "layers.2.mlp"]
    assert torch.allclose(lm._model_call(ids), bridge_logits(model, ids, steering), atol=1e-4)


def test_lm_eval_refuses_what_its_file_cannot_name(tiny4, tmp_path):
    model, _ = tiny4
    with pytest.raises(FormatError, match=r"blocks\.0\.hook_resid_pre is the embeddings' output"):
        vectors(tiny4, ["blocks.0.hook_resid_pre"]).to_lm_eval(tmp_path / "v.pt", model)
    with pytest.raises(FormatError, match=r"reads \.pt or \.pth files"):
        vectors(tiny4, ["blocks.1.hook_resid_post"]).to_lm_eval(tmp_path / "v.json", model)


# -- the command line ------------------------------------------------------------------------------


def test_cli_export_then_import_gives_the_same_steering_file(tmp_path, capsys):
    from sims_lens.tiny import tiny_hf_model

    folder = tmp_path / "tiny"
    hf, tok = tiny_hf_model(n_layers=4, d_model=D, seed=1)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    from sims_lens.models import load_model

    model, _ = load_model(str(folder), dtype="float32", device="cpu")
    steering = vectors((model, tok), ["blocks.2.hook_resid_post"])
    save_steering(steering, tmp_path / "policy.safetensors", model)
    gguf_path, back = tmp_path / "policy.gguf", tmp_path / "back.safetensors"
    args = ["--model", str(folder), "--out"]
    assert main(["export", str(tmp_path / "policy.safetensors"), "--format", "gguf", *args, str(gguf_path)]) == 0
    assert main(["import", str(gguf_path), *args, str(back)]) == 0
    imported = load_steering(back, model)
    assert torch.equal(imported.direction("blocks.2.hook_resid_post"), steering.direction("blocks.2.hook_resid_post"))
    assert main(["export", str(tmp_path / "policy.safetensors"), "--format", "gguf", *args, str(gguf_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "policy.safetensors"), *args, str(tmp_path / "x.safetensors")]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err


def test_cli_exports_a_run_folders_policy_by_iteration(tmp_path, capsys):
    from sims_lens.loop import Sims
    from sims_lens.tiny import tiny_hf_model
    from tests.helpers import HELDOUT, TRAIN, LetterOracle

    folder = tmp_path / "tiny"
    hf, tok = tiny_hf_model(n_layers=4, d_model=D, seed=1)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    run = tmp_path / "run"
    settings = {"iterations": 2, "prompts_per_iteration": 4, "samples_per_prompt": 3, "max_new_tokens": 6}
    settings.update(layers=[2], margin=0.0, heldout_size=2, validation_size=2, eval_samples_per_prompt=1, top_p=1.0)
    sims = Sims(
        str(folder), oracle=LetterOracle(), prompts=TRAIN, heldout_prompts=HELDOUT, out=run, progress=False, **settings
    )
    sims.run()
    out = tmp_path / "first.pt"
    assert main(["export", str(run), "--iteration", "1", "--format", "lm-eval", "--out", str(out)]) == 0
    first = load_steering(run / "steering" / "iter_001.safetensors")
    assert torch.allclose(
        torch.load(out, weights_only=True)["layers.2"]["steering_vector"], first.direction("blocks.2.hook_resid_post")
    )
    assert f"exported {run} iteration 1 as lm-eval" in capsys.readouterr().out
    assert main(["export", str(run), "--iteration", "5", "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "has policies for iterations [1, 2]" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
