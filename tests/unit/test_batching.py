"""Batch sizes fitted to free memory, and batches that halve and retry when memory runs out."""

from __future__ import annotations

import pytest
import torch

from sims_lens import batching, generation
from sims_lens.batching import (
    CAPS,
    MEMORY_SHARE,
    BatchMemoryError,
    bytes_per_row,
    check_batch_size,
    fitted_batch_size,
    run_in_batches,
)
from sims_lens.chat import encode_chat
from sims_lens.config import ConfigError, SimsConfig
from sims_lens.evaluation import response_nll
from sims_lens.generation import GenerationSettings, generate_ids

PROMPTS = ["Hi", "Tell me a story", "What is 2+2?", "Write a poem", "Why?", "Name a colour"]


def limit_memory(monkeypatch, model, rows: int, tokens: int, work="generate") -> None:
    """Free memory for exactly ``rows`` rows of ``tokens`` tokens (a simulated device)."""
    free = int((rows + 0.5) * bytes_per_row(model, work, tokens) / MEMORY_SHARE)
    monkeypatch.setattr(batching, "free_bytes", lambda device: free)


def test_auto_fits_the_batch_to_a_simulated_memory_limit(tiny, monkeypatch):
    model, tok = tiny
    ids = [encode_chat(tok, p) for p in PROMPTS * 2]
    settings = GenerationSettings(max_new_tokens=4)
    assert settings.batch_size == "auto"
    limit_memory(monkeypatch, model, 5, max(len(p) for p in ids) + 4)
    batches: list[int] = []
    auto = generate_ids(model, tok, ids, settings, on_batch=batches.append)
    assert batches == [5, 5, 2]
    monkeypatch.setattr(batching, "free_bytes", lambda device: 1 << 40)
    assert fitted_batch_size(model, "auto", "generate", 10_000, 50) == CAPS["cpu"]["generate"]
    assert fitted_batch_size(model, "auto", "generate", 3, 50) == 3  # never more than the rows
    assert fitted_batch_size(model, 7, "generate", 100, 50) == 7  # a number is used as given
    assert auto == generate_ids(model, tok, ids, GenerationSettings(max_new_tokens=4, batch_size=12))


def test_the_memory_per_row_counts_the_kv_cache_and_grows_with_tokens(tiny):
    model, _ = tiny
    cfg = model.cfg
    short, long = bytes_per_row(model, "generate", 10), bytes_per_row(model, "generate", 20)
    kv_per_token = 2 * cfg.n_layers * (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head * 4
    assert long - short >= 10 * kv_per_token
    assert bytes_per_row(model, "nll", 20, kept=11) > bytes_per_row(model, "nll", 20, kept=1)


def test_out_of_memory_halves_the_batch_and_retries_it():
    calls: list[tuple[int, int]] = []

    def run(start: int, stop: int) -> None:
        calls.append((start, stop))
        if stop - start > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.warns(UserWarning) as warned:
        run_in_batches(10, 8, run, "test")
    assert [str(w.message) for w in warned] == [
        "test: out of memory at batch size 8; retrying at 4",
        "test: out of memory at batch size 4; retrying at 2",
    ]
    assert calls == [(0, 8), (0, 4), (0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]

    def never_fits(start: int, stop: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.warns(UserWarning), pytest.raises(BatchMemoryError, match="one row does not fit in memory"):
        run_in_batches(4, 2, never_fits, "sampling")


def test_sampling_and_nll_survive_an_out_of_memory_error_with_the_same_results(tiny, monkeypatch):
    """A fake allocator failing once: the batch is halved, the answers and NLL are those of a plain run."""
    model, tok = tiny
    ids = [encode_chat(tok, p) for p in PROMPTS]
    settings = GenerationSettings(max_new_tokens=5, temperature=1.0, batch_size=6)
    expected = generate_ids(model, tok, ids, settings, seed=3)
    expected_nll = response_nll(model, expected, int(tok.pad_token_id), batch_size=6)
    real = generation._generate_batch
    failed: list[int] = []

    def fails_once(model_, prompts, *args):
        if not failed:
            failed.append(len(prompts))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model_, prompts, *args)

    monkeypatch.setattr(generation, "_generate_batch", fails_once)
    with pytest.warns(UserWarning, match="sampling: out of memory at batch size 6; retrying at 3"):
        assert generate_ids(model, tok, ids, settings, seed=3) == expected
    assert failed == [6]

    from sims_lens import evaluation

    real_batches = evaluation.padded_batches
    nll_failed: list[int] = []

    def batches_failing_once(exchanges, *args):
        if not nll_failed:
            nll_failed.append(len(exchanges))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_batches(exchanges, *args)

    monkeypatch.setattr(evaluation, "padded_batches", batches_failing_once)
    with pytest.warns(UserWarning, match="NLL: out of memory"):
        nll = response_nll(model, expected, int(tok.pad_token_id), batch_size=6)
    assert nll_failed == [6] and nll == pytest.approx(expected_nll, rel=1e-5)


@pytest.mark.parametrize("bad", [0, -2, "big", 2.5, True])
def test_a_batch_size_is_a_positive_integer_or_auto(bad):
    assert check_batch_size("auto") == "auto" and check_batch_size(3) == 3
    with pytest.raises(ValueError, match="integer >= 1 or 'auto'"):
        check_batch_size(bad)
    with pytest.raises(ValueError, match="integer >= 1 or 'auto'"):
        GenerationSettings(batch_size=bad)
    with pytest.raises(ConfigError, match="batch_size"):
        SimsConfig(batch_size=bad)
    assert SimsConfig().batch_size == "auto" and SimsConfig(batch_size=8).batch_size == 8
