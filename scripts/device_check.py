"""The GPU check: one prepared run on a machine with a GPU, writing its tables under ``$OUT``.

Three commands (BENCHMARKS.md, "GPU check"): ``make device-wheels`` runs the first here, and
``scripts/device_check.sh`` the other two on the GPU machine:

    python scripts/device_check.py wheels --folder .device-wheels        # here (make device-wheels): download
    python3 scripts/device_check.py env --wheels .device-wheels --site .device-site --out OUT   # there
    python3 scripts/device_check.py check --device cuda --out OUT        # there, with the site on PYTHONPATH

- ``wheels`` downloads, for the GPU machine's Python (3.12), the wheels of what the project imports
  that such a machine may lack (transformer-lens, transformers 5.23 and their dependencies), and
  copies the embedded model's tokenizer files next to them (a GPU machine has no GGUF).
- ``env`` (standard library only) installs from that folder, with no network, what the machine's
  Python lacks or has in a version the project's requirements refuse, into a folder that goes
  first on ``PYTHONPATH``. Both do their work in ``scripts/device_wheels.py``.
- ``check`` runs the steps, each into ``OUT/STEP.csv`` and ``OUT/STEP.md`` (``OUT/summary.md``
  holds them all): the environment; random-weight models of the paper's sizes built through
  ``random:CONFIG`` and whether the plain twin is accepted in their dtype; one SIMS iteration by phase
  with the memory peak; a two-iteration ``sims-lens run``; ``benchmarks/bench.py``. A failing step
  records its error and the next one runs; a step that would pass the time budget is stopped.

``--device cpu`` (or ``--sizes tiny``) runs every step at tiny sizes (``random:tiny``, one
iteration, a few tokens): ``tests/unit/test_device_check.py`` runs it so.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPTS = str(Path(__file__).resolve().parent)
if SCRIPTS not in sys.path:  # run as a script it is there; loaded by path (the tests) it may not be
    sys.path.insert(0, SCRIPTS)
BENCHMARKS = str(Path(SCRIPTS).parent / "benchmarks")
"""benchmarks/: its PhaseTimer times the iteration's phases here as in ``make bench``."""
# scripts/device_wheels.py: the work of wheels and env; it imports the standard library only, as this file does
from device_wheels import (  # noqa: E402
    DEVICE_PLATFORMS,
    DEVICE_PYTHON,
    download_wheels,
    install_env,
    installed_version,
)

ROOT = Path(__file__).resolve().parent.parent


# -- tables ---------------------------------------------------------------------------------------


def write_table(out: Path, step: str, title: str, rows: list[dict[str, Any]], notes: list[str]) -> str:
    """``OUT/STEP.csv`` (the rows) and ``OUT/STEP.md`` (title, notes, the rows); returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with (out / f"{step}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _cell(row.get(k)) for k in columns} for row in rows)
    lines = [f"## {title}", ""] + [f"{note}  " for note in notes]
    if rows:
        lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(k)).replace("|", "/") for k in columns) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    (out / f"{step}.md").write_text(text)
    return text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return " ".join(str(value).split())


@dataclass
class Report:
    """The steps' tables, and ``OUT/summary.md`` rewritten after each step."""

    out: Path
    title: str
    deadline: float
    sections: list[str] = field(default_factory=list)
    statuses: list[tuple[str, str, float]] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: str, title: str, fn: Callable[[list[str]], list[dict[str, Any]]]) -> Any:
        """Run one step: ``fn(notes)`` returns its rows; an exception is recorded and the check goes on."""
        notes: list[str] = []
        rows: list[dict[str, Any]] = []
        start = time.monotonic()
        status = "ok"
        print(f"== {step}: {title}", flush=True)
        try:
            if self.left() < 5:
                raise TimeoutError(f"not started: the time budget was spent ({-self.left():.0f} s over)")
            rows = fn(notes)
        except (Exception, KeyboardInterrupt) as err:  # KeyboardInterrupt: the shell's timeout (SIGINT)
            status = f"error: {type(err).__name__}: {' '.join(str(err).split())[:500]}"
            (self.out / f"{step}.error.txt").write_text(traceback.format_exc())
            if isinstance(err, KeyboardInterrupt):
                self.deadline = time.monotonic()  # the steps after it are not started
        seconds = time.monotonic() - start
        notes.insert(0, f"status: {status} ({seconds:.1f} s)")
        self.sections.append(write_table(self.out, step, title, rows, notes))
        self.statuses.append((step, status, seconds))
        self.write_summary()
        print(f"   {status} ({seconds:.1f} s)", flush=True)
        return rows

    def write_summary(self) -> None:
        head = [f"# {self.title}", "", "| step | status | seconds |", "| --- | --- | --- |"]
        head += [f"| {s} | {status} | {sec:.1f} |" for s, status, sec in self.statuses]
        (self.out / "summary.md").write_text("\n".join(head) + "\n\n" + "\n".join(self.sections))


# -- env (there; standard library only) -----------------------------------------------------------


def prepare_env(wheels_folder: Path, site: Path, out: Path) -> int:
    """Install what the project needs and this Python lacks into ``site``; the table goes to ``OUT/install``."""
    rows, notes = install_env(wheels_folder, site)
    write_table(out, "install", "Install (no network)", rows, notes)
    print("\n".join(notes))
    return 0


# -- check (there) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """What each step runs at."""

    shapes: tuple[str, ...]
    iteration_model: str
    iteration: dict[str, Any]
    run_model: str
    run: dict[str, Any]
    bench_model: str
    bench_args: tuple[str, ...]


TINY_WORK = {
    "prompts_per_iteration": 4,
    "samples_per_prompt": 4,
    "max_new_tokens": 16,
    "heldout_size": 4,
    "eval_samples_per_prompt": 1,
    "validation_size": 4,
    "top_p": 1.0,  # a random model's flat distribution makes top-p sort the whole vocabulary: slow on a CPU
}
"""The tiny sizes' work, for the iteration and the run alike."""
SIZES = {
    "full": Sizes(
        shapes=("smollm2-135m", "llama-3.2-1b", "llama-3-8b"),
        iteration_model="llama-3-8b",
        iteration={"prompts_per_iteration": 64, "samples_per_prompt": 10, "max_new_tokens": 128, "batch_size": 128},
        run_model="llama-3-8b",
        run={
            "iterations": 2,
            "prompts_per_iteration": 16,
            "samples_per_prompt": 4,
            "max_new_tokens": 64,
            "heldout_size": 8,
            "batch_size": 64,
        },
        bench_model="llama-3.2-1b",
        bench_args=(),
    ),
    "tiny": Sizes(
        shapes=("tiny",),
        iteration_model="tiny",
        iteration=TINY_WORK,
        run_model="tiny",
        run={"iterations": 1, **TINY_WORK},
        bench_model="tiny",
        bench_args=("--only", "steering", "--repeats", "1"),
    ),
}


@dataclass
class Context:
    device: str
    dtype: Any
    sizes: Sizes
    out: Path
    work: Path
    report: Report
    models: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def memory_now(ctx: Context) -> float:
    """GiB allocated on the GPU, or the process's resident memory on the CPU."""
    import torch

    if ctx.device.startswith("cuda"):
        return gib(torch.cuda.memory_allocated())
    return _status_kib("VmRSS") / 2**20


def memory_peak(ctx: Context) -> tuple[float, str]:
    import torch

    if ctx.device.startswith("cuda"):
        return gib(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return _status_kib("VmHWM") / 2**20, "peak resident memory of the process (VmHWM)"


def reset_peak(ctx: Context) -> None:
    import torch

    if ctx.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def _status_kib(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1])


def free(ctx: Context, keep: str | None = None) -> None:
    import gc

    import torch

    for name in [n for n in ctx.models if n != keep]:
        del ctx.models[name]
    gc.collect()
    if ctx.device.startswith("cuda"):
        torch.cuda.empty_cache()


def environment_step(ctx: Context, notes: list[str]) -> list[dict[str, Any]]:
    import torch

    from sims_lens.random_models import TOKENIZER_ENV

    rows = [
        {"item": "python", "value": f"{platform.python_version()} ({sys.executable})"},
        {"item": "machine", "value": f"{platform.machine()}, {os.cpu_count()} CPU cores"},
        {"item": "torch", "value": f"{torch.__version__} (CUDA {torch.version.cuda})"},
        {"item": "device", "value": ctx.device},
        {"item": "dtype", "value": str(ctx.dtype).removeprefix("torch.")},
    ]
    if ctx.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(ctx.device)
        rows.append({"item": "GPU", "value": f"{props.name}, {gib(props.total_memory):.1f} GiB"})
    for package in ("transformers", "transformer-lens", "tokenizers", "huggingface-hub", "accelerate", "plotly"):
        rows.append({"item": package, "value": installed_version(package) or "not installed"})
    rows.append({"item": TOKENIZER_ENV, "value": os.environ.get(TOKENIZER_ENV, "(unset: the embedded model's cache)")})
    rows.append({"item": "commit", "value": _git_commit()})
    return rows


def _git_commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown (no git)"


def build_step(ctx: Context, notes: list[str]) -> list[dict[str, Any]]:
    """Each shape through ``load_model("random:SHAPE")``, and whether its plain twin is accepted."""
    import torch

    from sims_lens.models import load_model
    from sims_lens.plain_twin import plain_twin, twin_verdict
    from sims_lens.random_models import RANDOM_SHAPES

    rows = []
    for shape in ctx.sizes.shapes:
        row: dict[str, Any] = {"model": f"random:{shape}"}
        rows.append(row)
        try:
            free(ctx, keep=ctx.sizes.iteration_model)
            before = memory_now(ctx)
            ctx.sync()
            start = time.perf_counter()
            model, tokenizer = load_model(f"random:{shape}", dtype=ctx.dtype, device=ctx.device)
            ctx.sync()
            row["build_s"] = time.perf_counter() - start
            params = sum(p.numel() for p in model.original_model.parameters())
            row["parameters"] = f"{params:,}"
            row["as_documented"] = "yes" if params == RANDOM_SHAPES[shape].parameters else "NO"
            row["memory_gib"] = memory_now(ctx) - before
            row["layers"], row["d_model"], row["vocab"] = model.cfg.n_layers, model.cfg.d_model, len(tokenizer)
            row["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
            with torch.no_grad():
                twin = plain_twin(model)
            verdict = twin_verdict(model)
            row["twin_accepted"] = "yes" if twin is not None else "no"
            row["largest_logit_difference"] = verdict.largest_difference
            row["tolerance"] = verdict.tolerance
            row["twin_reason"] = verdict.reason
            ctx.models[shape] = (model, tokenizer)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"
            (ctx.out / f"build-{shape}.error.txt").write_text(traceback.format_exc())
    notes.append(
        "memory_gib: allocated by the build (CUDA) or resident memory added (CPU); twin: the sampler's plain "
        "Hugging Face twin (sims_lens/plain_twin.py), accepted when its logits match the bridge's within the tolerance"
    )
    if any("error" in row for row in rows):
        raise RuntimeError("; ".join(f"{r['model']}: {r['error']}" for r in rows if "error" in r))
    return rows


def iteration_step(ctx: Context, notes: list[str]) -> list[dict[str, Any]]:
    """One SIMS iteration through the Python API, timed by phase, with the memory peak."""
    from sims_lens import Sims
    from sims_lens.models import load_model

    shape = ctx.sizes.iteration_model
    free(ctx, keep=shape)
    if shape not in ctx.models:
        ctx.models[shape] = load_model(f"random:{shape}", dtype=ctx.dtype, device=ctx.device)
    model, tokenizer = ctx.models[shape]
    settings = {
        "iterations": 1,
        "layers": [int(model.cfg.n_layers) // 2],
        "margin": 0.0,  # random weights write random text: every separated prompt counts
        "observe": "all",
        **ctx.sizes.iteration,
    }
    notes.append(f"random:{shape}, oracle lexicon_sentiment, learner mean_diff, {json.dumps(settings)}")
    reset_peak(ctx)
    sims = Sims(model, tokenizer, oracle="lexicon_sentiment", learner="mean_diff", progress=False, **settings)
    ctx.sync()
    start = time.perf_counter()
    sims.prepare()
    ctx.sync()
    prepared = time.perf_counter() - start
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    from bench import PhaseTimer

    timer = PhaseTimer(sims, ctx.sync)
    start = time.perf_counter()
    result = sims.step(1)
    ctx.sync()
    total = time.perf_counter() - start
    peak, how = memory_peak(ctx)
    rows: list[dict[str, Any]] = [
        {"item": "prepare: base model's held-out and validation answers (once per run)", "value": prepared, "unit": "s"}
    ]
    for phase in PhaseTimer.PHASES:
        seconds = timer.seconds.get(phase, 0.0)
        rows.append({"item": f"phase {phase}", "value": seconds, "unit": "s", "share": seconds / total})
    other = total - sum(timer.seconds.values())
    rows.append({"item": "the rest (head-to-head, metrics)", "value": other, "unit": "s", "share": other / total})
    rows.append({"item": "iteration (step 1)", "value": total, "unit": "s", "share": 1.0})
    tokens = sum(len(s.exchange.response_ids) for s in result.samples)
    rows.append({"item": "sampled response tokens", "value": tokens, "unit": "tokens"})
    sample_s = timer.seconds.get("sample", 0.0)
    rows.append({"item": "sampling rate", "value": tokens / sample_s if sample_s else None, "unit": "tokens/s"})
    rows.append({"item": "pairs", "value": len(result.selection.pairs), "unit": "pairs"})
    rows.append({"item": "memory peak", "value": peak, "unit": "GiB", "note": how})
    model_gib = gib(sum(p.numel() * p.element_size() for p in model.original_model.parameters()))
    rows.append({"item": "the model's weights", "value": model_gib, "unit": "GiB"})
    return rows


def run_step(ctx: Context, notes: list[str]) -> list[dict[str, Any]]:
    """``sims-lens run`` (as ``python -m sims_lens.cli run``) on a random-weight model, in a fresh process."""
    from sims_lens.random_models import RANDOM_SHAPES

    free(ctx)
    sizes = ctx.sizes
    folder = ctx.work / "cli-run"
    if folder.exists():
        shutil.rmtree(folder)
    shape = RANDOM_SHAPES[sizes.run_model].config
    layer = 15 if shape is None else int(shape["num_hidden_layers"]) // 2  # None: SmolLM2-135M's 30 layers
    sets = {**sizes.run, "layers": [layer], "margin": 0.0}
    command = [sys.executable, "-m", "sims_lens.cli", "run", "--device", ctx.device, "--model"]
    command += [f"random:{sizes.run_model}", "--out", str(folder), "--no-progress"]
    command += [arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    command += ["--set", f'dtype="{str(ctx.dtype).removeprefix("torch.")}"']
    notes.append("command: " + " ".join(command[1:]))
    seconds, code = _subprocess(ctx, command, "cli_run.log", limit=300)
    notes.append(f"exit status {code} after {seconds:.1f} s; output in cli_run.log")
    kept = ctx.out / "cli-run"
    kept.mkdir(exist_ok=True)
    for name in ("config.toml", "state.json", "metrics.csv"):  # the big files (observed/, figures/) stay behind
        if (folder / name).is_file():
            shutil.copy2(folder / name, kept / name)
    state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").is_file() else {}
    rows = []
    if (folder / "metrics.csv").is_file():
        with (folder / "metrics.csv").open() as handle:
            wanted = {"reward_mean", "win_rate_vs_base", "perplexity_under_base", "response_length"}
            for row in csv.DictReader(handle):
                if row["split"] == "heldout" and row["metric"] in wanted and not row["layer"]:
                    rows.append({"iteration": row["iteration"], "metric": row["metric"], "value": float(row["value"])})
    finished = int(state.get("completed_iterations", 0))
    notes.append(f"iterations finished (state.json): {finished} of {sizes.run['iterations']}")
    if code != 0 or finished != sizes.run["iterations"]:
        raise RuntimeError(f"sims-lens run exited {code} with {finished} iterations finished; see cli_run.log")
    return rows


def bench_step(ctx: Context, notes: list[str]) -> list[dict[str, Any]]:
    """``benchmarks/bench.py --model random:SHAPE`` in a fresh process; its CSV rows."""
    free(ctx)
    folder = ctx.out / "bench"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--device", ctx.device, "--model"]
    command += [f"random:{ctx.sizes.bench_model}", "--out", str(folder), *ctx.sizes.bench_args]
    notes.append("command: " + " ".join(command[1:]))
    seconds, code = _subprocess(ctx, command, "bench.log", limit=420)
    notes.append(f"exit status {code} after {seconds:.1f} s; output in bench.log")
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
        with path.open() as handle:
            keep = ("benchmark", "case", "value", "unit", "peer", "peer_value", "ratio", "note")
            rows += [{k: row.get(k, "") for k in keep} for row in csv.DictReader(handle)]
    if code != 0:
        printed = [line for line in (ctx.out / "bench.log").read_text().splitlines() if line[:1].isalpha()]
        notes.append("rows printed before it stopped: " + " // ".join(printed[-12:]))
        raise RuntimeError(f"bench.py exited {code}; see bench.log")
    return rows


def _subprocess(ctx: Context, command: list[str], log: str, limit: float) -> tuple[float, int]:
    """Run ``command`` with its output in ``OUT/log``, stopped at ``limit`` seconds or the budget's end."""
    timeout = max(10.0, min(limit, ctx.report.left() - 5))
    start = time.monotonic()
    with (ctx.out / log).open("w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=timeout)
        except KeyboardInterrupt:  # the shell's overall timeout: the child goes too
            process.kill()
            process.wait()
            raise
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            handle.write(f"\n[device_check] stopped after {timeout:.0f} s (the time budget)\n")
            code = 124
    return time.monotonic() - start, code


def run_check(args: argparse.Namespace) -> int:
    os.environ.setdefault("SIMS_LENS_ANSWER_CACHE", "off")  # measure the work, never read answers back
    import torch  # the one thing the machine must have; sims_lens is first imported inside a step

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = dtypes.get(args.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    sizes = SIZES[args.sizes or ("full" if device.startswith("cuda") else "tiny")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    title = f"GPU check: {device}, {str(dtype).removeprefix('torch.')}, sizes {args.sizes or 'by device'}"
    report = Report(out, title, time.monotonic() + args.budget)
    if (out / "install.md").is_file():
        report.sections.append((out / "install.md").read_text())
    ctx = Context(device, dtype, sizes, out, work, report)
    torch.manual_seed(0)
    report.run("environment", "Environment", lambda notes: environment_step(ctx, notes))
    report.run("build", "Random-weight models (random:CONFIG) and the plain twin", lambda n: build_step(ctx, n))
    report.run("iteration", "One SIMS iteration by phase (Python API)", lambda n: iteration_step(ctx, n))
    report.run("cli_run", "sims-lens run on a random-weight model", lambda n: run_step(ctx, n))
    report.run("bench", "benchmarks/bench.py", lambda n: bench_step(ctx, n))
    shutil.rmtree(work, ignore_errors=True)
    failed = [s for s, status, _ in report.statuses if status != "ok"]
    print(f"tables in {out} (summary.md); {'all steps ok' if not failed else 'failed: ' + ', '.join(failed)}")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser("wheels", help="download the wheels and tokenizer files for the GPU machine")
    wheels.add_argument("--folder", default=str(ROOT / ".device-wheels"))
    wheels.add_argument("--python-version", default=DEVICE_PYTHON)
    wheels.add_argument("--platform", action="append", default=None, help="wheel platform tags (repeatable)")
    env = sub.add_parser("env", help="install what is missing from the wheels (no network)")
    env.add_argument("--wheels", default=str(ROOT / ".device-wheels"))
    env.add_argument("--site", default=str(ROOT / ".device-site"))
    env.add_argument("--out", required=True)
    check = sub.add_parser("check", help="run the steps, each into OUT/STEP.csv and OUT/STEP.md")
    check.add_argument("--device", default="auto")
    check.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    check.add_argument("--sizes", choices=sorted(SIZES), default=None, help="default: full on CUDA, tiny elsewhere")
    check.add_argument("--out", required=True)
    check.add_argument("--work", default=None, help="scratch folder for the run folder (default: OUT/.work)")
    check.add_argument("--budget", type=float, default=450.0, help="seconds for all steps")
    args = parser.parse_args(argv)
    if args.command == "wheels":
        return download_wheels(Path(args.folder), args.python_version, tuple(args.platform or DEVICE_PLATFORMS))
    if args.command == "env":
        return prepare_env(Path(args.wheels), Path(args.site), Path(args.out))
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
