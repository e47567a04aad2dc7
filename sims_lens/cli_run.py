"""``sims-lens run`` and ``sims-lens demo``: a SIMS run into a run folder, with a live table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from sims_lens.config import SimsConfig, load_config

MODEL_HELP = "the embedded default, a hub name, a local HF folder, a .gguf file or random:SHAPE (the key model)"

DEMO_OVERRIDES = [
    "iterations=3",
    "prompts_per_iteration=16",
    "samples_per_prompt=4",
    "max_new_tokens=40",
    "layers=[15]",
    "multiplier=1.0",
    'update="accumulate"',
    'oracle="lexicon_sentiment"',
    "heldout_size=20",
]


class TablePrinter:
    """Prints one line per iteration: held-out reward of the policy next to the base model's.

    Columns come from the iteration's metric rows. A relative oracle (the self-judge) has no
    reward mean (its scores sum to zero within a prompt), so ``policy`` and ``base`` show ``-``
    and the win rate against the base model is the signal; a reference oracle's mean shows as ``ref``.
    """

    def __init__(self, oracle: str, reference: str = "") -> None:
        self.oracle = oracle
        self.reference = reference
        self.start = time.perf_counter()
        self.base: float | None = None

    def on_phase(self, iteration: int, phase: str, payload: dict[str, Any]) -> None:
        if phase != "base":
            return
        values = _heldout(payload["metrics"])
        self.base = values.get("reward_mean")
        reward = "relative scores, no mean" if self.base is None else f"{self.base:.3f}"
        line = (
            f"held-out reward ({self.oracle}); base model pi_0: {reward} "
            f"(perplexity {values['perplexity_under_base']:.2f})"
        )
        if "reference_reward_mean" in values:
            line += f"; reference {self.reference}: {values['reference_reward_mean']:.3f}"
        print(line)
        ref = f"  {'ref':>7}" if self.reference else ""
        print(
            f"{'iter':>4}  {'policy':>7}  {'base':>7}{ref}  {'win rate':>8}  {'ppl':>6}  {'len':>5}  "
            f"{'pairs':>5}  {'dropped':>7}  {'time':>6}"
        )
        sys.stdout.flush()

    def on_iteration(self, result: Any) -> None:
        values = _heldout(result.metrics)
        train = {r["metric"]: r["value"] for r in result.metrics if r["split"] == "train" and r["layer"] is None}
        ref = f"  {_cell(values.get('reference_reward_mean'))}" if self.reference else ""
        print(
            f"{result.iteration:>4}  {_cell(values.get('reward_mean'))}  {_cell(self.base)}{ref}  "
            f"{values['win_rate_vs_base']:>8.2f}  {values['perplexity_under_base']:>6.2f}  "
            f"{values['response_length']:>5.1f}  {int(train['pairs']):>5}  "
            f"{int(train['dropped_prompts']):>7}  {time.perf_counter() - self.start:>5.0f}s"
            + (_rejected_note(result.metrics) if result.rejected else "")
        )
        sys.stdout.flush()


def _rejected_note(rows: list[dict[str, Any]]) -> str:
    ratio = next(r["value"] for r in rows if r["split"] == "guard" and r["metric"] == "perplexity_ratio")
    return f"  REJECTED: its perplexity was {ratio:.1f}x the base model's; previous policy kept (row shows it)"


def _heldout(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in rows if r["split"] == "heldout" and r["layer"] is None}


def _cell(value: float | None) -> str:
    return f"{value:>7.3f}" if value is not None else f"{'-':>7}"


def run_command(args: argparse.Namespace, overrides: list[str] | None = None) -> int:
    """``sims-lens run``: one run into ``--out``, or with ``--seeds`` one run per seed in ``--out/seed_S``."""
    sets = (overrides or []) + (args.set or [])
    if getattr(args, "device", None) is not None:
        sets.append(f'device="{args.device}"')
    if getattr(args, "model", None) is not None:
        sets.append(f"model={json.dumps(args.model)}")
    seeds = parse_seeds(getattr(args, "seeds", None))
    if not seeds:
        return _run_one(Path(args.out), args, sets)[0]
    loaded: tuple[Any, Any] | None = None  # the model loads once for all seeds
    for seed in seeds:
        out = Path(args.out) / f"seed_{seed}"
        print(f"== seed {seed}: {out}")
        code, loaded = _run_one(out, args, [*sets, f"seed={seed}"], loaded)
        if code:
            return code
    return 0


def parse_seeds(text: str | None) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` -> seeds; None or empty -> none."""
    if not text:
        return []
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"--seeds {text!r}: use integers separated by commas (0,1,2) or a range (0-4)")
        seeds += list(range(int(low), int(high) + 1)) if high else [int(low)]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} lists a seed twice")
    return seeds


def _run_one(
    out: Path, args: argparse.Namespace, sets: list[str], loaded: tuple[Any, Any] | None = None
) -> tuple[int, tuple[Any, Any]]:
    """One run into ``out``; returns the exit status and the (model, tokenizer) it used."""
    from sims_lens.loop import NotSeparableError, PolicyRejectedError, Sims
    from sims_lens.run_folder import RunFolder, open_run

    folder = RunFolder(out)
    resume = bool(args.resume) or (getattr(args, "auto_resume", False) and folder.state_path.is_file())
    config: SimsConfig | None
    if args.config is None and resume and folder.has_config():
        config = load_config(folder.config_path, sets)  # resume: the run's own config, with any --set applied
    else:
        config = load_config(args.config, sets) if (args.config is not None or sets) else None
    if resume and not folder.has_config():
        open_run(folder.path, config, resume=True)  # raises the clear "no config.toml" error
    if not resume:
        from sims_lens.run_folder import check_new_folder

        check_new_folder(folder.path)  # before the model loads; Sims checks again
    folder.refuse_if_locked()
    model, tokenizer = loaded if loaded is not None else (None, None)
    sims = Sims.from_config(
        config or SimsConfig(), model=model, tokenizer=tokenizer, progress=not args.no_progress, out=out, resume=resume
    )
    used = (sims.model, sims.tokenizer)
    done = folder.completed_iterations if resume and folder.state_path.is_file() else 0
    if done >= sims.config.iterations:
        print(f"{out} already finished {done} of {sims.config.iterations} iterations; nothing to do")
        return 0, used
    config = sims.config
    sims.callbacks += [
        TablePrinter(config.oracle, config.reference_oracle),
        *_analysis_callbacks(folder.path, sims.model, sims.tokenizer),
    ]
    print(
        f"run folder {folder.path} ({'resuming after iteration ' + str(done) if done else 'new'}); "
        f"model {config.model}, learner {config.learner}, layers {config.layers}, update {config.update}"
    )
    try:
        for _ in sims.iterate():
            pass
    except NotSeparableError as err:
        print(
            f"error: {err}. Finished iterations are kept in {folder.path}; for other settings start a new --out.",
            file=sys.stderr,
        )
        return 2, used
    except PolicyRejectedError as err:
        print(
            f'error: {err}; the run stops here (on_rejected = "stop"). Every iteration is kept in {folder.path} '
            "(--resume goes on from the kept policy).",
            file=sys.stderr,
        )
        return 2, used
    print(f"done: {folder.path} (metrics, samples, steering per iteration, config; figures/index.html)")
    return 0, used


def eval_command(args: argparse.Namespace) -> int:
    """``sims-lens eval``: policies of one or more runs against baselines, with intervals."""
    from sims_lens.eval_runs import DEFAULT_SYSTEM_PROMPT, EvalSettings, evaluate_runs
    from sims_lens.models import load_model
    from sims_lens.run_folder import RunFolder

    settings = EvalSettings(  # the options first: a bad one fails before any folder is read
        args.prompts,
        args.samples,
        args.reference_oracle,
        args.system_prompt or DEFAULT_SYSTEM_PROMPT,
        multipliers=parse_multipliers(args.multipliers),
    )
    runs = expand_run_dirs(args.run_dirs)
    config = RunFolder(runs[0]).read_config()
    start = time.perf_counter()
    model, tokenizer = load_model(
        args.model or config.model, dtype=config.dtype, device=args.device if args.device is not None else config.device
    )
    frame = evaluate_runs(runs, args.out, model, tokenizer, settings)
    print(f"evaluated {len(runs)} run(s) in {time.perf_counter() - start:.0f} s: {args.out}/eval.csv, samples.jsonl")
    try:
        from analysis.eval_report import format_table, summary_table, write_eval_report
    except ImportError:
        print(frame.to_string(index=False))
        return 0
    from analysis.eval_report import format_differences, load_differences, monotonicity_line
    from sims_lens.chat import system_placement

    label = "all" if len(runs) > 1 else Path(runs[0]).name
    print(format_table(summary_table(frame, run=label)))
    print(f"prompting: the instruction went in as a {system_placement(tokenizer)} (the tokenizer's chat template)")
    print(monotonicity_line(frame))
    print(f"\npaired differences ({args.out}/differences.csv):")
    print(format_differences(load_differences(args.out)))
    print(f"figures: {write_eval_report(args.out)}")
    return 0


def parse_multipliers(text: str | None) -> tuple[float, ...]:
    """``--multipliers 0.5,1.5,2``: positive numbers, comma-separated."""
    if not text:
        return ()
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--multipliers {text!r}: use positive numbers separated by commas, e.g. 0.5,1.5,2") from None
    if not values or any(not (v > 0 and v != float("inf")) for v in values):
        raise ValueError(f"--multipliers {text!r}: use positive numbers separated by commas, e.g. 0.5,1.5,2")
    return values


def expand_run_dirs(paths: list[str]) -> list[Path]:
    """Run folders, where a folder of ``seed_*`` runs (``sims-lens run --seeds``) stands for all of them."""
    from sims_lens.run_folder import RunFolder

    out: list[Path] = []
    for path in map(Path, paths):
        if RunFolder(path).has_config():
            out.append(path)
            continue
        seeds = sorted(p for p in path.glob("seed_*") if RunFolder(p).has_config()) if path.is_dir() else []
        if not seeds:
            raise ValueError(f"{path} is not a run folder (no config.toml) and holds no seed_* runs")
        out += seeds
    return out


def _analysis_callbacks(run_dir: Path, model: Any, tokenizer: Any) -> list[Any]:
    """Analysis plugs in here (the CLI is the only place that wires core and analysis together).

    The model goes along for the logit lens of every observed layer's candidate direction.
    """
    try:
        from analysis.live import live_callbacks
    except ImportError:
        return []
    return list(live_callbacks(run_dir, model=model, tokenizer=tokenizer))


def register(sub: Any) -> None:
    run = sub.add_parser("run", help="run SIMS into a run folder (resumable)")
    run.add_argument("--config", default=None, help="a TOML configuration file")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration key (dotted for tables: learners.hpr.epochs=20)",
    )
    run.add_argument("--out", required=True, help="the run folder")
    run.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last finished iteration"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--seeds", default=None, help="several runs, one per seed, in OUT/seed_S (e.g. 0,1,2,3,4 or 0-4)")
    run.add_argument("--device", default=None, help="auto (CUDA when available; the default), cpu, cuda, cuda:N, mps")
    run.add_argument("--model", default=None, help=MODEL_HELP)
    run.set_defaults(func=run_command)

    ev = sub.add_parser("eval", help="every iteration's policy of the runs given against baselines, with intervals")
    ev.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (or folders of seed_* runs)")
    ev.add_argument("--out", required=True, help="where to write eval.csv, samples.jsonl and index.html")
    ev.add_argument("--prompts", default=None, help="held-out prompts (default: each run's held-out prompts)")
    ev.add_argument("--samples", type=int, default=None, help="samples per prompt (default: the run's)")
    ev.add_argument("--reference-oracle", default=None, help="an oracle not used for training (default: the run's)")
    ev.add_argument(
        "--system-prompt", default=None, help="the prompting baseline's system prompt (default: a warm-tone request)"
    )
    ev.add_argument(
        "--multipliers",
        default=None,
        metavar="A,B,C",
        help="also evaluate the last policy and the norm-matched baselines scaled by each (NAMExM)",
    )
    ev.add_argument("--device", default=None, help="auto (CUDA when available; the default), cpu, cuda, cuda:N, mps")
    ev.add_argument("--model", default=None, help="the model the runs' policies steer (default: the runs' own)")
    ev.set_defaults(func=eval_command)

    fit = sub.add_parser("fit", help="a steering file from your own (prompt, chosen, rejected) pairs")
    fit.add_argument("--pairs", required=True, help="a .jsonl/.csv file (fields prompt, chosen, rejected) or hf:NAME")
    fit.add_argument("--out", required=True, help="the steering file to write (.safetensors)")
    fit.add_argument("--model", default=None, help=MODEL_HELP)
    fit.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32), float32, bfloat16")
    fit.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N, mps")
    fit.add_argument("--learner", default="mean_diff", help="mean_diff, pca, probe, ablate_add or hpr")
    fit.add_argument("--layers", default=None, help="layers to steer: 15, 3,15 or all (default: the middle layer)")
    fit.add_argument("--hook", default="hook_resid_post", help="the hook point of each layer")
    fit.add_argument("--reduction", default="mean", choices=["mean", "last"], help="response tokens: mean or last")
    fit.add_argument("--multiplier", type=float, default=1.0)
    fit.set_defaults(func=fit_command)

    report = sub.add_parser("report", help="rebuild a run folder's figures and index.html; print its held-out table")
    report.add_argument("run_dir", help="a run folder (finished or partial)")
    report.set_defaults(func=report_command)

    demo = sub.add_parser("demo", help="the main job: SIMS on the embedded model with the VADER oracle")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--seeds", default=None, help="several demo runs, one per seed, in OUT/seed_S")
    demo.add_argument("--device", default=None, help="auto (CUDA when available; the default), cpu, cuda, cuda:N, mps")
    demo.add_argument("--model", default=None, help=MODEL_HELP)
    demo.set_defaults(func=demo_command)


def fit_command(args: argparse.Namespace) -> int:
    """``sims-lens fit``: a steering file from your own (prompt, chosen, rejected) pairs."""
    from sims_lens.cli_export import norms_text, refuse_bad_steering_out
    from sims_lens.config import parse_layers
    from sims_lens.fitting import fit_pairs
    from sims_lens.models import load_model
    from sims_lens.pairs import load_pairs
    from sims_lens.steering.io import save_steering

    out = Path(args.out)
    refuse_bad_steering_out(out)
    pairs = load_pairs(args.pairs)  # a malformed file fails before the model loads
    layers = parse_layers(args.layers) if args.layers is not None else None
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    steering = fit_pairs(
        model,
        tokenizer,
        pairs,
        learner=args.learner,
        layers=layers,
        hook=args.hook,
        reduction=args.reduction,
        multiplier=args.multiplier,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_steering(steering, out, model)
    print(f"fitted {args.learner} on {len(pairs)} pairs: {out} (norms: {norms_text(steering)})")
    return 0


def report_command(args: argparse.Namespace) -> int:
    """``sims-lens report RUN_DIR``: figures and summary from the run folder alone."""
    try:
        from analysis.report import report, summary_table
    except ImportError as err:
        raise ValueError(f"'sims-lens report' needs the analysis package next to sims_lens ({err})") from None
    table = summary_table(Path(args.run_dir))
    index = report(Path(args.run_dir))
    print(f"held-out metrics of {args.run_dir} (iteration 0 = base model):")
    print(table.to_string(float_format=lambda x: f"{x:.3f}", na_rep="-"))
    print(f"figures: {index}")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    args.config, args.resume, args.auto_resume = None, False, True  # a finished or interrupted demo resumes
    return run_command(args, DEMO_OVERRIDES)
