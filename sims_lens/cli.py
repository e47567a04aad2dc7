"""The ``sims-lens`` command line.

The command line (this module and :mod:`sims_lens.cli_run`, which imports the live analysis
callbacks and the report) is the only place that wires the core to ``analysis``.
Every failure the user can fix ends in one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from sims_lens.models import DTYPE_NAMES, EMBEDDED_MODEL, ModelLoadError


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help=f"embedded default ({EMBEDDED_MODEL}), a Hugging Face hub name, a local HF folder, or a .gguf file",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=list(DTYPE_NAMES), help="auto: bfloat16 on CUDA, else float32"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N, mps")


def cmd_info(args: argparse.Namespace) -> int:
    """Print which model loads, where it is cached, its dtype, shape and hook points."""
    import time

    from sims_lens.answer_cache import answer_cache_dir
    from sims_lens.models import cache_dir, load_model, resolve_source
    from sims_lens.plain_twin import twin_verdict

    source = resolve_source(args.model)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    seconds = time.perf_counter() - start
    cfg = model.cfg
    suffixes = sorted({name.split(".", 2)[-1] for name in model.hook_dict if name.startswith("blocks.0.")})
    print(f"model        {source.name} ({source.origin}{f': {source.path}' if source.path else ''})")
    print(f"cache        {cache_dir()}")
    print(f"answers      {answer_cache_dir() or 'not cached (SIMS_LENS_ANSWER_CACHE=off)'}")
    print(f"load time    {seconds:.1f} s")
    print(f"dtype        {next(model.parameters()).dtype} on {next(model.parameters()).device}")
    print(f"layers       {cfg.n_layers}")
    print(f"d_model      {cfg.d_model}")
    print(f"vocab        {len(tokenizer)}")
    print(f"chat format  {'yes' if getattr(tokenizer, 'chat_template', None) else 'no (raw prompts)'}")
    print(f"plain twin   {twin_line(twin_verdict(model))}")
    print(f"hook points  blocks.{{0..{cfg.n_layers - 1}}}.{{name}}, name in:")
    for suffix in suffixes:
        print(f"               {suffix}")
    return 0


def twin_line(verdict: Any) -> str:
    """``sims-lens info``'s line on the plain twin: used or not, and the largest logit difference."""
    if verdict.largest_difference is None:
        return f"{'used' if verdict.used else 'not used'}: {verdict.reason}"
    numbers = f"largest logit difference {verdict.largest_difference:.3g}, tolerance {verdict.tolerance:.3g}"
    if verdict.used:
        return f"used for sampling, capture and NLL ({numbers})"
    return f"not used, the bridge runs (slower): {verdict.reason}"


def cmd_steer_demo(args: argparse.Namespace) -> int:
    """Generate with and without one steering vector learned from a handful of contrast pairs."""
    from sims_lens.demo import steering_demo

    steering_demo(
        args.model,
        dtype=args.dtype,
        device=args.device,
        layer=args.layer,
        multiplier=args.multiplier,
        max_new_tokens=args.max_new_tokens,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sims-lens",
        description="Self-improving model steering (SIMS) inside TransformerLens.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="which model, where cached, dtype, layers, d_model, hook points")
    _add_model_args(info)
    info.set_defaults(func=cmd_info)

    steer = sub.add_parser("steer-demo", help="generate with and without one contrastive steering vector")
    _add_model_args(steer)
    steer.add_argument("--layer", type=int, default=None, help="layer to steer (default: the middle layer)")
    steer.add_argument("--multiplier", type=float, default=2.0)
    steer.add_argument("--max-new-tokens", type=int, default=40)
    steer.set_defaults(func=cmd_steer_demo)

    _register_more(sub)
    return parser


def _register_more(sub: Any) -> None:
    """Subcommands that live in other modules register here (keeps this file a wiring table)."""
    from sims_lens.cli_export import register as register_export
    from sims_lens.cli_run import register as register_run
    from sims_lens.cli_sweep import register as register_sweep

    register_run(sub)
    register_sweep(sub)
    register_export(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except (ModelLoadError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
