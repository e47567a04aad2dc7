"""Why HPR steers or wrecks: per layer and setting, what its gate and angles do, and what the policy does.

HPR (ARCHITECTURE.md, "Learners") is fitted on iteration 1's pairs of a run folder: those were
sampled from the base model, so they are exactly the pairs any learner's iteration 1 sees with
the same seed and prompts. For each layer and learner setting it reports

- ``probe_acc_train`` / ``probe_acc_heldout``: the gate's accuracy on its own token pairs and on
  the token pairs of the run's later iterations (other prompts);
- ``gated_prompt`` / ``gated_response``: the share of held-out prompt tokens and response tokens
  the gate rotates (prompt tokens are only edited under ``positions = "all"``);
- ``angle_mean_deg`` / ``angle_p90_deg``: the rotation actually applied to gated response tokens
  (after the multiplier and ``max_reach``), and ``target_angle_deg``, the mean angle it was trained on;
- with ``evaluate``: held-out reward and perplexity under the base model of the one-iteration
  policy, next to the base model's.

    python -m analysis.hpr_study RUN_DIR [--layers 15] [--out hpr_study.csv]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from sims_lens.capture import capture_activations, pair_tokens
from sims_lens.chat import Exchange, encode_chat, end_token_ids
from sims_lens.evaluation import evaluate, heldout_seed
from sims_lens.run_folder import RunFolder
from sims_lens.steering.functions import SteeringSet, hpr_rotation
from sims_lens.steering.learners import make_learner

SETTINGS: dict[str, dict[str, Any]] = {
    "reference (all positions, unbounded angle)": {"max_reach": math.inf, "positions": "all"},
    "generated positions, unbounded angle": {"max_reach": math.inf, "positions": "generated"},
    "defaults (generated, reach 1)": {"positions": "generated"},
    "generated, reach 0.5 (to the hyperplane)": {"max_reach": 0.5, "positions": "generated"},
}


def pair_exchanges(
    folder: RunFolder, tokenizer: Any, iterations: Sequence[int]
) -> list[tuple[Exchange, Exchange, str]]:
    """(y+, y-, prompt id) of the pairs the run selected at ``iterations``, as token ids."""
    samples = {(s["iteration"], s["prompt_id"], s["index"]): s for s in folder.read_samples()}
    out = []
    for pair in folder.read_pairs():
        if pair["update"] not in iterations:
            continue
        sides = []
        for side in ("positive", "negative"):
            ref = pair[side]
            sample = samples[(ref["iteration"], pair["prompt_id"], ref["index"])]
            sides.append(Exchange(tuple(encode_chat(tokenizer, sample["prompt"])), tuple(sample["response_ids"])))
        out.append((sides[0], sides[1], pair["prompt_id"]))
    return out


def token_pairs(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[Exchange, Exchange, str]], hook: str
) -> tuple[Tensor, Tensor]:
    pad, ends = int(tokenizer.pad_token_id), end_token_ids(tokenizer)
    pos = capture_activations(model, [p for p, _, _ in pairs], [hook], pad, end_ids=ends).tokens
    neg = capture_activations(model, [n for _, n, _ in pairs], [hook], pad, end_ids=ends).tokens
    a, b = pair_tokens(pos, neg)
    return a[:, 0], b[:, 0]


def prompt_tokens(model: Any, tokenizer: Any, pairs: Sequence[tuple[Exchange, Exchange, str]], hook: str) -> Tensor:
    prompts = [
        Exchange(p.prompt_ids[:-1], p.prompt_ids[-1:]) for p, _, _ in pairs
    ]  # every prompt token as a "response"
    rows = capture_activations(
        model, [Exchange((), ex.ids) for ex in prompts], [hook], int(tokenizer.pad_token_id)
    ).tokens
    return torch.cat(rows)[:, 0]


def study(
    model: Any,
    tokenizer: Any,
    run_dir: str | Path,
    layers: Sequence[int],
    settings: Mapping[str, Mapping[str, Any]] = SETTINGS,
    evaluate_policies: bool = True,
    heldout_size: int = 20,
) -> pd.DataFrame:
    from sims_lens.generation import GenerationSettings
    from sims_lens.oracles import make_oracle

    folder = RunFolder(run_dir)
    config = folder.read_config()
    train = pair_exchanges(folder, tokenizer, [1])
    later = pair_exchanges(folder, tokenizer, list(range(2, folder.completed_iterations + 1)))
    if not later:
        raise ValueError(f"{folder.path} has only one iteration; held-out pairs come from iterations 2 and later")
    oracle = make_oracle(config.oracle, config.oracle_settings(), model=model, tokenizer=tokenizer)
    heldout = folder.load_prompts("heldout_prompts", config)[:heldout_size]
    generation = GenerationSettings(config.max_new_tokens, config.temperature, config.top_p, config.batch_size)

    def run_eval(policy: SteeringSet | None) -> Any:
        return evaluate(
            model,
            tokenizer,
            heldout,
            oracle,
            generation,
            steering=policy,
            samples_per_prompt=config.eval_samples_per_prompt,
            seed=heldout_seed(config.seed),
        )

    base = run_eval(None) if evaluate_policies else None
    rows = []
    for layer in layers:
        hook = config.hook_names([layer])[0]
        pos, neg = token_pairs(model, tokenizer, train, hook)
        held_pos, held_neg = token_pairs(model, tokenizer, later, hook)
        prompt = prompt_tokens(model, tokenizer, later, hook)
        for name, setting in settings.items():
            learner_settings = {k: v for k, v in setting.items() if k != "positions"}
            fn = make_learner("hpr", {**config.learners.get("hpr", {}), **learner_settings}).fit(pos, neg, hook)
            probe = fn.params["probe"]
            gated, angle = hpr_rotation(torch.cat([held_pos, held_neg]), fn.params, fn.multiplier * config.multiplier)
            gated_prompt, _ = hpr_rotation(prompt, fn.params, fn.multiplier * config.multiplier)
            row = {
                "layer": layer,
                "setting": name,
                "pairs": len(train),
                "token_pairs": len(pos),
                "probe_acc_train": fn.extra["train_probe_accuracy"],
                "probe_acc_heldout": float(
                    ((held_pos @ probe > 0).float().mean() + (held_neg @ probe <= 0).float().mean()) / 2
                ),
                "gated_prompt": float(gated_prompt.float().mean()),
                "gated_response": float(gated.float().mean()),
                "angle_mean_deg": math.degrees(float(angle[gated].mean())) if bool(gated.any()) else 0.0,
                "angle_p90_deg": math.degrees(float(angle[gated].quantile(0.9))) if bool(gated.any()) else 0.0,
                "target_angle_deg": math.degrees(float(fn.extra["mean_target_angle"])),
            }
            if evaluate_policies:
                assert base is not None
                fn.multiplier *= config.multiplier
                policy = SteeringSet.from_functions([fn], positions=str(setting.get("positions", "generated")))
                result = run_eval(policy)
                row |= {
                    "reward": result.reward_mean,
                    "base_reward": base.reward_mean,
                    "perplexity": result.perplexity,
                    "base_perplexity": base.perplexity,
                }
            rows.append(row)
            print(pd.DataFrame([row]).round(3).to_string(index=False, header=len(rows) == 1), flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    from sims_lens.models import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--layers", default="15")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = RunFolder(args.run_dir).read_config()
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    frame = study(
        model, tokenizer, args.run_dir, [int(x) for x in args.layers.split(",")], evaluate_policies=not args.no_eval
    )
    if args.out:
        frame.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
