"""Generation throughput on the embedded model: unsteered, one steered layer, every layer steered.

Prints tokens/s for each setting and the ratios to the unsteered run. A benchmark, not a test:
run it on an otherwise idle machine (``make bench``).

    python benchmarks/steering_throughput.py [--dtype float32] [--batch 8] [--tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from sims_lens.chat import encode_chat
from sims_lens.generation import GenerationSettings, generate_ids
from sims_lens.models import load_model
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.hooks import apply_steering

PROMPTS = [
    "Describe a walk in the city.",
    "What do you think about cooking dinner?",
    "Tell me about the weather.",
    "Give me three tips for sleeping well.",
    "Write a haiku about autumn.",
    "How do I learn to swim?",
    "What is a good name for a cat?",
    "Explain how rainbows form.",
]


def steering_for(layers: list[int], d_model: int) -> SteeringSet:
    g = torch.Generator().manual_seed(0)
    return SteeringSet.from_functions(
        [
            SteeringFunction(
                "add", f"blocks.{layer}.hook_resid_post", {"vector": 1e-3 * torch.randn(d_model, generator=g)}
            )
            for layer in layers
        ]
    )


def tokens_per_second(model, tok, prompts, settings, steering, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        with apply_steering(model, steering) if steering is not None else nullcontext():
            start = time.perf_counter()
            out = generate_ids(model, tok, prompts, settings)
            seconds = time.perf_counter() - start
        best = max(best, sum(len(ex.response_ids) for ex in out) / seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tok = load_model(None, dtype=args.dtype)
    n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    prompts = [encode_chat(tok, p) for p in (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]]
    # a tiny vector keeps every run's text (and so its token count) the same as the unsteered one
    settings = GenerationSettings(max_new_tokens=args.tokens, batch_size=args.batch)
    tokens_per_second(model, tok, prompts, settings, None, 1)  # warm-up
    cases = {
        "unsteered": None,
        "1 layer": steering_for([n_layers // 2], d_model),
        f"all {n_layers} layers": steering_for(list(range(n_layers)), d_model),
    }
    results = {}
    # interleave the cases so drifting machine load hits them alike
    for _ in range(args.repeats):
        for name, steering in cases.items():
            results[name] = max(results.get(name, 0.0), tokens_per_second(model, tok, prompts, settings, steering, 1))
    base = results["unsteered"]
    print(
        f"embedded model, {args.dtype}, batch {args.batch}, {args.tokens} new tokens, best of {args.repeats}, "
        f"{torch.get_num_threads()} threads"
    )
    for name, value in results.items():
        print(f"{name:>15}: {value:7.1f} tokens/s  ratio {value / base:.3f}  cost {100 * (1 - value / base):+.1f}%")


if __name__ == "__main__":
    main()
