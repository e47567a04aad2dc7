"""The growing KV cache holds exactly what Hugging Face's concatenating DynamicLayer holds."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from sims_lens.kv_cache import GrowingLayer, growing_cache


def _kv(batch: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 3, n, 8, generator=g), torch.randn(batch, 3, n, 8, generator=g)


@pytest.mark.parametrize("reserve", [0, 2, 40])
def test_updates_reorders_and_growth_match_the_dynamic_layer(reserve):
    g = torch.Generator().manual_seed(0)
    ours, theirs = GrowingLayer(reserve), DynamicLayer()
    script = [("update", 4, 5), ("reorder", [0, 0, 1, 3, 3, 2]), ("update", 6, 1), ("update", 6, 1)]
    script += [("reorder", [5, 0, 2])]
    script += [("update", 3, 1)] * 5 + [("update", 3, 4), ("crop", -2), ("update", 3, 1)]
    for op, *args in script:
        if op == "update":
            k, v = _kv(args[0], args[1], g)
            got, expected = ours.update(k, v), theirs.update(k, v)
            for a, b in zip(got, expected, strict=True):
                assert torch.equal(a, b)
        elif op == "reorder":
            index = torch.tensor(args[0])
            ours.reorder_cache(index)
            theirs.reorder_cache(index)
        else:
            ours.crop(args[0])
            theirs.crop(args[0])
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    with pytest.raises(ValueError, match="negative"):
        ours.crop(1)


def test_a_growing_layer_writes_in_place_within_its_reserve():
    g = torch.Generator().manual_seed(1)
    layer = GrowingLayer(reserve=3)
    layer.update(*_kv(2, 4, g))
    storage = layer.keys.untyped_storage().data_ptr()
    for _ in range(3):
        layer.update(*_kv(2, 1, g))
        assert layer.keys.untyped_storage().data_ptr() == storage  # no copy of the cache
    layer.update(*_kv(2, 1, g))  # past the reserve: a new buffer
    assert layer.get_seq_length() == 8 and layer.keys.shape == (2, 3, 8, 8)


def test_selecting_rows_by_index_or_by_mask_matches_the_dynamic_layer():
    g = torch.Generator().manual_seed(2)
    for select in (torch.tensor([2, 0]), torch.tensor([True, False, True, False])):
        ours, theirs = GrowingLayer(4), DynamicLayer()
        k, v = _kv(4, 3, g)
        ours.update(k, v)
        theirs.update(k, v)
        ours.batch_select_indices(select)
        theirs.batch_select_indices(select)
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


def test_the_cache_of_a_model_config_uses_growing_layers(tiny):
    model, _ = tiny
    cache = growing_cache(model.original_model.config, reserve=5)
    assert len(cache.layers) == model.cfg.n_layers and all(isinstance(x, GrowingLayer) for x in cache.layers)
    assert cache.get_seq_length() == 0
