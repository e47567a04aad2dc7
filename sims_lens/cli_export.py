"""``sims-lens export`` and ``sims-lens import``: policies to and from other tools' formats (docs/interop.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

FORMATS = ("gguf", "lm-eval")


def refuse_existing(out: Path) -> None:
    """The steering commands never overwrite a file."""
    if out.exists():
        raise ValueError(f"--out {out} already exists; choose a new file name (nothing is overwritten)")


def refuse_bad_steering_out(out: Path) -> None:
    """A command that writes a steering file: ``--out`` names a new ``.safetensors`` file."""
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: name a .safetensors file (a .json copy of its metadata is written beside it)")
    refuse_existing(out)


def norms_text(steering: Any) -> str:
    """``blocks.15.hook_resid_post 3.21, ...``: each hook's vector norm, as the steering commands print it."""
    return ", ".join(f"{hook} {norm:.2f}" for hook, norm in steering.norms().items())


def export_command(args: argparse.Namespace) -> int:
    """A run's policy (or a steering file) as a llama.cpp control vector or an lm-eval ``.pt`` file."""
    from sims_lens.models import load_model
    from sims_lens.run_folder import RunFolder
    from sims_lens.steering.io import load_steering, read_metadata

    source, out = Path(args.source), Path(args.out)
    refuse_existing(out)
    folder = RunFolder(source)
    if folder.has_config():
        done = folder.steering_iterations("policy")
        if not done:
            raise ValueError(f"{source} has no finished iteration to export")
        iteration = args.iteration if args.iteration is not None else done[-1]
        if iteration not in done:
            raise ValueError(f"--iteration {iteration}: {source} has policies for iterations {done}")
        config = folder.read_config()
        model, _ = load_model(args.model or config.model, dtype="float32", device=args.device)
        steering: Any = folder.load_steering(iteration, "policy", model)
        what = f"{source} iteration {iteration}"
    elif source.suffix == ".safetensors":
        if args.iteration is not None:
            raise ValueError("--iteration applies to a run folder; a steering file holds one policy")
        model, _ = load_model(
            args.model or read_metadata(source).get("model_name") or None, dtype="float32", device=args.device
        )
        steering, what = load_steering(source, model), str(source)
    else:
        raise ValueError(f"{source} is neither a run folder (no config.toml) nor a .safetensors steering file")
    written = steering.to_gguf(out, model) if args.format == "gguf" else steering.to_lm_eval(out, model)
    print(f"exported {what} as {args.format}: {written} (norms: {norms_text(steering)})")
    return 0


def import_command(args: argparse.Namespace) -> int:
    """A llama.cpp control vector (repeng, cvector-generator, ...) as a sims-lens steering file."""
    from sims_lens.models import load_model
    from sims_lens.steering.functions import SteeringSet
    from sims_lens.steering.gguf_vectors import check_control_vector_file
    from sims_lens.steering.io import save_steering

    source, out = Path(args.source), Path(args.out)
    refuse_bad_steering_out(out)
    check_control_vector_file(source)  # a bad file fails before the model loads
    model, _ = load_model(args.model, dtype="float32", device=args.device)
    steering = SteeringSet.from_gguf(source, model)
    save_steering(steering, out, model)
    print(f"imported {source}: {out} (norms: {norms_text(steering)}); use it as init = {str(out)!r} or load_steering")
    return 0


def register(sub: Any) -> None:
    export = sub.add_parser("export", help="a policy as a llama.cpp control vector (GGUF) or an lm-eval .pt file")
    export.add_argument("source", metavar="RUN_DIR|STEERING_FILE", help="a run folder or a .safetensors steering file")
    export.add_argument(
        "--iteration", type=int, default=None, help="the run's policy after this iteration (default: last)"
    )
    export.add_argument(
        "--format", required=True, choices=FORMATS, help="gguf: llama.cpp --control-vector; lm-eval: --model steered"
    )
    export.add_argument("--out", required=True, help="the file to write (.gguf, or .pt for lm-eval)")
    export.add_argument("--model", default=None, help="the model the policy steers (default: the run's, or the file's)")
    export.add_argument("--device", default="cpu", help="where the model loads to read its shape (cpu, cuda, ...)")
    export.set_defaults(func=export_command)

    imp = sub.add_parser("import", help="a llama.cpp control vector (.gguf) as a sims-lens steering file")
    imp.add_argument("source", metavar="FILE.gguf")
    imp.add_argument("--out", required=True, help="the steering file to write (.safetensors)")
    imp.add_argument("--model", default=None, help="the model it steers (default: the embedded model)")
    imp.add_argument("--device", default="cpu", help="where the model loads to check the vectors (cpu, cuda, ...)")
    imp.set_defaults(func=import_command)
