"""Pair selection (``sims_lens/contrast.py``): best vs worst, top k vs bottom k, the margin, the memory bank
of contrast sampling (pairs across iterations, each used once) and the labels of a batch."""

from __future__ import annotations

import dataclasses

import pytest

from sims_lens.chat import Exchange
from sims_lens.contrast import MemoryBank, Pair, Sample, Selection, label_samples, select_pairs


def sample(pid: str, reward: float, it: int = 1, index: int = 0) -> Sample:
    return Sample(it, pid, "p", f"r{reward}", Exchange((1,), (2,)), reward, index=index)


def prompt(pid: str, rewards: list[float], it: int = 1) -> list[Sample]:
    """One prompt's K samples of one iteration, indexed 0..K-1 as the loop indexes them."""
    return [sample(pid, r, it, j) for j, r in enumerate(rewards)]


def rewards(selection: Selection) -> list[tuple[float, float]]:
    return [(p.positive.reward, p.negative.reward) for p in selection.pairs]


# ---------------------------------------------------------------- select_pairs: one batch


def test_best_vs_worst_and_tie_dropping():
    samples = [sample("a", 0.1), sample("a", 0.9), sample("a", 0.5), sample("b", 0.3), sample("b", 0.3)]
    selection = select_pairs(samples, margin=0.0)
    assert [(p.positive.reward, p.negative.reward) for p in selection.pairs] == [(0.9, 0.1)]
    assert selection.dropped_prompts == 1 and selection.considered_prompts == 2
    assert select_pairs(samples, margin=0.9).dropped_prompts == 2


def test_top_k_vs_bottom_k():
    samples = [sample("a", r) for r in (0.1, 0.2, 0.8, 0.9)]
    selection = select_pairs(samples, pairs_per_prompt=2)
    assert [(p.positive.reward, p.negative.reward) for p in selection.pairs] == [(0.9, 0.1), (0.8, 0.2)]


def test_the_pairs_are_the_batch_samples_themselves_in_prompt_order():
    samples = prompt("b", [0.25, 1.0]) + prompt("a", [0.5, 0.0, 0.75])
    selection = select_pairs(samples)
    # prompts in order of first appearance; the sides are the very sample objects of the batch
    assert [p.positive.prompt_id for p in selection.pairs] == ["b", "a"]
    assert selection.positives[0] is samples[1] and selection.negatives[0] is samples[0]
    assert selection.positives[1] is samples[4] and selection.negatives[1] is samples[3]
    assert [p.margin for p in selection.pairs] == [0.75, 0.75]
    assert selection.dropped_prompts == 0 and selection.considered_prompts == 2


def test_the_margin_is_strict():
    samples = prompt("a", [0.25, 0.75])  # a gap of exactly 0.5
    assert rewards(select_pairs(samples, margin=0.5)) == []
    assert select_pairs(samples, margin=0.5).dropped_prompts == 1
    assert rewards(select_pairs(samples, margin=0.4375)) == [(0.75, 0.25)]


def test_pairs_per_prompt_takes_at_most_half_the_samples_and_filters_each_pair_by_the_margin():
    samples = prompt("a", [0.5, 0.0, 1.0, 0.625, 0.25])  # ranked: 1.0, 0.625, 0.5, 0.25, 0.0
    # K = 5: at most 5 // 2 = 2 pairs, the median sample is never used
    assert rewards(select_pairs(samples, pairs_per_prompt=3)) == [(1.0, 0.0), (0.625, 0.25)]
    # the second pair (gap 0.375) fails margin 0.5; the prompt still counts as separated
    selection = select_pairs(samples, pairs_per_prompt=2, margin=0.5)
    assert rewards(selection) == [(1.0, 0.0)] and selection.dropped_prompts == 0


def test_a_prompt_with_one_sample_is_dropped():
    selection = select_pairs(prompt("a", [1.0]) + prompt("b", [0.0, 0.5]))
    assert rewards(selection) == [(0.5, 0.0)]
    assert (selection.dropped_prompts, selection.considered_prompts) == (1, 2)


def test_pair_records():
    pair = Pair(sample("a", 0.75, it=3, index=2), sample("a", 0.25, it=1, index=0))
    assert pair.margin == 0.5 and pair.cross_iteration
    assert pair.key == ((3, "a", 2), (1, "a", 0))
    assert pair.to_record(4) == {
        "update": 4,
        "prompt_id": "a",
        "positive": {"iteration": 3, "index": 2, "reward": 0.75},
        "negative": {"iteration": 1, "index": 0, "reward": 0.25},
        "margin": 0.5,
        "applied": True,
    }
    assert pair.to_record(4, applied=False)["applied"] is False
    assert not Pair(sample("a", 0.75, 2, 1), sample("a", 0.25, 2, 0)).cross_iteration


# ---------------------------------------------------------------- MemoryBank: contrast sampling


def test_contrast_sampling_picks_largest_margins_across_iterations_and_evicts_old():
    bank = MemoryBank(size=6)
    bank.add([sample("a", 0.4, 1, 0), sample("a", 0.5, 1, 1), sample("b", 0.0, 1, 0), sample("b", 0.1, 1, 1)])
    bank.add([sample("a", 1.0, 2, 0), sample("c", 0.2, 2, 0), sample("c", 0.9, 2, 1)])
    assert len(bank.samples) == 6  # the oldest sample was evicted
    selection = bank.select(margin=0.05, max_pairs=2)
    assert [round(p.margin, 3) for p in selection.pairs] == [0.7, 0.5]
    assert selection.pairs[1].positive.iteration == 2 and selection.pairs[1].negative.iteration == 1


def test_the_bank_evicts_the_oldest_samples_first():
    bank = MemoryBank(size=3)
    first, second = prompt("a", [0.0, 0.25], it=1), prompt("a", [0.5, 0.75, 1.0], it=2)
    bank.add(first)
    assert bank.samples == first
    bank.add(second)
    assert bank.samples == second  # both of iteration 1's samples went, the newest 3 stay in order


def test_the_bank_never_reuses_a_pair():
    bank = MemoryBank()
    bank.add(prompt("a", [0.0, 0.5, 1.0]))
    seen = []
    for _ in range(3):
        [pair] = bank.select(margin=0.0, max_pairs=10).pairs
        seen.append((pair.positive.index, pair.negative.index))
        bank.mark_used([pair])
    # largest gap first; the two gaps of 0.5 in the order of their keys
    assert seen == [(2, 0), (1, 0), (2, 1)]
    exhausted = bank.select(margin=0.0, max_pairs=10)
    assert exhausted.pairs == [] and (exhausted.dropped_prompts, exhausted.considered_prompts) == (1, 1)


def test_mark_used_takes_pair_keys_too():
    """On resume the used pairs come back from ``pairs.jsonl`` as keys, not pairs."""
    bank = MemoryBank()
    bank.add(prompt("a", [0.0, 0.5, 1.0]))
    bank.mark_used([((1, "a", 2), (1, "a", 0))])
    [pair] = bank.select(margin=0.0, max_pairs=10).pairs
    assert pair.key == ((1, "a", 1), (1, "a", 0))


def test_the_bank_takes_disjoint_pairs_per_prompt_by_margin():
    bank = MemoryBank()
    bank.add(prompt("a", [0.0, 0.25, 0.5, 0.75]))
    selection = bank.select(margin=0.0, max_pairs=10, pairs_per_prompt=2)
    # by hand: (3, 0) gap 0.75; the gaps of 0.5, (2, 0) and (3, 1), share a sample with it; of the gaps
    # of 0.25 (1, 0) does too, and (2, 1) is the first free one
    assert [(p.positive.index, p.negative.index) for p in selection.pairs] == [(3, 0), (2, 1)]
    taken = [s.key for p in selection.pairs for s in (p.positive, p.negative)]
    assert len(taken) == len(set(taken))


def test_the_bank_pairs_samples_of_different_iterations_and_caps_the_total_by_margin():
    bank = MemoryBank()
    bank.add(prompt("a", [0.25, 0.375], it=1) + prompt("b", [0.5, 0.5], it=1) + prompt("c", [0.0, 0.125], it=1))
    bank.add(prompt("a", [1.0, 0.5], it=2) + prompt("b", [0.5], it=2) + prompt("c", [0.5], it=2))
    selection = bank.select(margin=0.1, max_pairs=2)
    # per prompt the best pair: a 1.0 (it 2) vs 0.25 (it 1), c 0.5 (it 2) vs 0.0 (it 1); b's rewards all tie
    assert rewards(selection) == [(1.0, 0.25), (0.5, 0.0)]
    assert all(p.cross_iteration for p in selection.pairs)
    assert [p.positive.prompt_id for p in selection.pairs] == ["a", "c"]
    assert (selection.dropped_prompts, selection.considered_prompts) == (1, 3)
    assert rewards(bank.select(margin=0.1, max_pairs=1)) == [(1.0, 0.25)]


def test_the_bank_margin_is_strict():
    bank = MemoryBank()
    bank.add(prompt("a", [0.25, 0.75]))
    assert bank.select(margin=0.5, max_pairs=4).pairs == []
    assert rewards(bank.select(margin=0.4375, max_pairs=4)) == [(0.75, 0.25)]


# ---------------------------------------------------------------- labels


def test_label_samples_marks_the_chosen_samples_by_identity():
    samples = prompt("a", [0.0, 0.5, 1.0]) + prompt("b", [0.25, 0.25])
    for s in samples:
        s.label = "stale"
    twin = dataclasses.replace(samples[2])  # equal field by field to the chosen positive, another object
    assert twin == samples[2]
    selection = select_pairs(samples)
    label_samples([*samples, twin], selection)
    assert [s.label for s in samples] == ["-", "", "+", "", ""]
    assert twin.label == ""


def test_label_samples_leaves_earlier_iterations_samples_alone():
    """Under contrast sampling a pair may use an earlier iteration's sample; only this batch is labelled."""
    old, new = prompt("a", [0.0], it=1), prompt("a", [1.0, 0.5], it=2)
    bank = MemoryBank()
    bank.add(old)
    bank.add(new)
    selection = bank.select(margin=0.0, max_pairs=1)
    assert selection.pairs[0].negative is old[0]
    label_samples(new, selection)
    assert [s.label for s in new] == ["+", ""] and old[0].label == ""


@pytest.mark.parametrize("reference", [None, 0.5])
def test_sample_records(reference):
    s = Sample(2, "a", "Hi", "Hello", Exchange((1, 2), (7, 8, 9)), 0.25, "+", reference, index=1)
    record = s.to_record()
    assert s.key == (2, "a", 1)
    assert record == {
        "iteration": 2,
        "prompt_id": "a",
        "index": 1,
        "prompt": "Hi",
        "response": "Hello",
        "reward": 0.25,
        "label": "+",
        **({} if reference is None else {"reference_reward": 0.5}),
        "response_ids": [7, 8, 9],
    }
