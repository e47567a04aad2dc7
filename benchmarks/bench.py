"""Every benchmark in one command (``make bench``): a table on stdout and the same rows as CSV.

Each figure is measured next to its peer in the same process, the two alternating over the
repeats (best of N each), so drifting machine load hits both alike:

- sampler: the project's sampler (``generation.generate_ids``) against Hugging Face ``generate``
  on a separate, un-bridged instance of the same weights, greedy (same text, checked) at batch 16
  and 64, and SIMS-shaped sampling (16 prompts x 4 samples, temperature 1, top-p 0.95);
- steering cost: the sampler with an additive vector at every layer against no hooks;
- capture: ``capture_activations`` (one steered layer, every layer observed) against a plain
  forward over the same tokens;
- one SIMS iteration on the embedded model, wall time by phase, at three sizes (N, K, tokens);
- what observing every layer adds to the largest of them (the capture's extra layers, the live
  analysis), against its wall time;
- peak memory of a capture against the number of samples;
- the machine's matmul rate (``torch.mm`` and, on the CPU, oneDNN with a prepacked weight), and the
  share of the faster one the sampler reaches;
- llama.cpp's ``llama-batched-bench`` on the same GGUF next to the sampler's greedy rows, where it
  is installed (``benchmarks/llama_cpp_bench.py``).

It runs unchanged on a GPU (``--device auto`` picks CUDA, ``--dtype auto`` bfloat16 there). A
benchmark, not a test: run it on an otherwise idle machine.

    python benchmarks/bench.py [--device auto] [--dtype auto] [--repeats 3] [--out benchmarks/results] [--model M]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from llama_cpp_bench import batched_bench, find_batched_bench

from sims_lens.capture import capture_activations, padded_batches
from sims_lens.chat import Exchange, encode_chat, end_token_ids, left_pad, split_generated
from sims_lens.config import SimsConfig
from sims_lens.generation import GenerationSettings, generate_ids
from sims_lens.loop import sims_from_config
from sims_lens.models import load_hf, load_model, resolve_device, resolve_dtype, resolve_source
from sims_lens.packed_linear import packing_applies
from sims_lens.prompts import load_prompts
from sims_lens.steering.functions import SteeringFunction, SteeringSet
from sims_lens.steering.hooks import apply_steering


@dataclass
class Row:
    benchmark: str
    case: str
    value: float
    unit: str
    peer: str = ""
    peer_value: float | None = None
    ratio: float | None = None
    note: str = ""


@dataclass
class Bench:
    model: Any
    tokenizer: Any
    device: str
    repeats: int
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(format_row(row), flush=True)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def format_row(row: Row) -> str:
    peer = f"{row.peer}: {row.peer_value:.4g}" if row.peer_value is not None else ""
    ratio = f"{row.ratio:.3f}" if row.ratio is not None else ""
    return f"{row.benchmark:<24} {row.case:<34} {row.value:>10.4g} {row.unit:<9} {peer:<34} {ratio:>6}  {row.note}"


def best_alternating(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Best (largest) value of each function, the functions taking turns each repeat."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = max(best.get(name, float("-inf")), fn())
    return best


def prompt_ids(tokenizer: Any, n: int) -> list[list[int]]:
    texts = [p.text for p in load_prompts("builtin", "train") + load_prompts("builtin", "heldout")]
    return [encode_chat(tokenizer, t) for t in (texts * (n // len(texts) + 1))[:n]]


def hf_generate(hf: Any, tokenizer: Any, prompts: list[list[int]], settings: GenerationSettings) -> list[Exchange]:
    """Hugging Face ``generate`` on left-padded batches, rows cut at the first end token as ours are."""
    eos = end_token_ids(tokenizer)
    device = next(hf.parameters()).device
    out: list[Exchange] = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start : start + settings.batch_size]
        ids, mask = left_pad(chunk, int(tokenizer.pad_token_id))
        sampling = settings.temperature > 0
        tokens = hf.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if sampling else None,
            top_k=None,
            eos_token_id=eos,
            pad_token_id=int(tokenizer.pad_token_id),
        )
        out += [
            split_generated(row.tolist(), ids.shape[1], m.tolist(), eos) for row, m in zip(tokens, mask, strict=True)
        ]
    return out


def tokens_per_second(bench: Bench, run: Callable[[], list[Exchange]]) -> Callable[[], float]:
    def measure() -> float:
        bench.sync()
        start = time.perf_counter()
        out = run()
        bench.sync()
        return sum(len(ex.response_ids) for ex in out) / (time.perf_counter() - start)

    return measure


def sampler_vs_hf(bench: Bench, hf: Any) -> None:
    model, tok = bench.model, bench.tokenizer
    for batch in (16, 64):
        prompts = prompt_ids(tok, batch)
        settings = GenerationSettings(max_new_tokens=40, batch_size=batch)
        same = generate_ids(model, tok, prompts, settings) == hf_generate(hf, tok, prompts, settings)
        best = best_alternating(
            {
                "ours": tokens_per_second(bench, lambda p=prompts, s=settings: generate_ids(model, tok, p, s)),
                "hf": tokens_per_second(bench, lambda p=prompts, s=settings: hf_generate(hf, tok, p, s)),
            },
            bench.repeats,
        )
        bench.add(
            Row(
                "sampler vs HF generate",
                f"greedy, batch {batch}, 40 tokens",
                best["ours"],
                "tokens/s",
                "HF generate",
                best["hf"],
                best["ours"] / best["hf"],
                f"same text: {'yes' if same else 'NO'}",
            )
        )
    prompts = [p for p in prompt_ids(tok, 16) for _ in range(4)]
    settings = GenerationSettings(max_new_tokens=40, temperature=1.0, top_p=0.95, batch_size=64)
    best = best_alternating(
        {
            "ours": tokens_per_second(bench, lambda: generate_ids(model, tok, prompts, settings, seed=0)),
            "hf": tokens_per_second(bench, lambda: hf_generate(hf, tok, prompts, settings)),
        },
        bench.repeats,
    )
    bench.add(
        Row(
            "sampler vs HF generate",
            "sampling, 16 prompts x 4, T=1, p=.95",
            best["ours"],
            "tokens/s",
            "HF generate",
            best["hf"],
            best["ours"] / best["hf"],
            "different random streams: tokens/s, not text",
        )
    )


def steered_vs_unsteered(bench: Bench) -> None:
    model, tok = bench.model, bench.tokenizer
    n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    g = torch.Generator().manual_seed(0)
    # a tiny vector keeps the steered text (so the work) the same as the unsteered one
    every = SteeringSet.from_functions(
        [
            SteeringFunction(
                "add", f"blocks.{layer}.hook_resid_post", {"vector": 1e-4 * torch.randn(d_model, generator=g)}
            )
            for layer in range(n_layers)
        ]
    )
    prompts = prompt_ids(tok, 16)
    settings = GenerationSettings(max_new_tokens=40, batch_size=16)

    def steered() -> list[Exchange]:
        with apply_steering(model, every):
            return generate_ids(model, tok, prompts, settings)

    same = steered() == generate_ids(model, tok, prompts, settings)
    best = best_alternating(
        {
            "steered": tokens_per_second(bench, steered),
            "plain": tokens_per_second(bench, lambda: generate_ids(model, tok, prompts, settings)),
        },
        bench.repeats,
    )
    bench.add(
        Row(
            "steering cost",
            f"greedy, batch 16, all {n_layers} layers",
            best["steered"],
            "tokens/s",
            "unsteered",
            best["plain"],
            best["steered"] / best["plain"],
            f"same text: {'yes' if same else 'NO'}",
        )
    )


def sample_exchanges(bench: Bench, n: int) -> list[Exchange]:
    prompts = prompt_ids(bench.tokenizer, n)
    return generate_ids(bench.model, bench.tokenizer, prompts, GenerationSettings(max_new_tokens=40, batch_size=64))


def capture_vs_forward(bench: Bench, exchanges: list[Exchange]) -> None:
    model, tok = bench.model, bench.tokenizer
    n_layers = int(model.cfg.n_layers)
    steered = [f"blocks.{n_layers // 2}.hook_resid_post"]
    observed = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    pad, ends = int(tok.pad_token_id), end_token_ids(tok)
    n_tokens = sum(len(ex.ids) for ex in exchanges)
    device = next(model.parameters()).device

    def timed(fn: Callable[[], Any]) -> Callable[[], float]:
        def measure() -> float:
            bench.sync()
            start = time.perf_counter()
            fn()
            bench.sync()
            return n_tokens / (time.perf_counter() - start)

        return measure

    @torch.no_grad()
    def forward() -> None:
        for _, ids, kwargs in padded_batches(exchanges, pad, 16, device):
            model(ids, **kwargs)

    best = best_alternating(
        {
            "capture": timed(
                lambda: capture_activations(model, exchanges, steered, pad, 16, end_ids=ends, mean_hooks=observed)
            ),
            "forward": timed(forward),
        },
        bench.repeats,
    )
    bench.add(
        Row(
            "capture",
            f"{len(exchanges)} samples, 1 steered + {n_layers} observed",
            best["capture"],
            "tokens/s",
            "plain forward",
            best["forward"],
            best["capture"] / best["forward"],
            "batch 16",
        )
    )


def capture_memory(bench: Bench, args: argparse.Namespace) -> None:
    """Peak memory of one capture (one steered + every layer observed) against the number of samples.

    Each size runs in a fresh process (the allocator keeps freed memory, so a peak measured after
    other work says nothing): the peak RSS on the CPU (``VmHWM``, reset through
    ``/proc/self/clear_refs``) or CUDA's ``max_memory_allocated``, minus the same measure just
    before the capture, next to the size of what the capture returns.
    """
    for n in (16, 64, 256):
        command = [sys.executable, __file__, "--memory-child", str(n), "--device", args.device, "--dtype", args.dtype]
        command += ["--model", args.model] if args.model else []
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peak, kept = (float(x) for x in out.split())
        bench.add(Row("capture memory", f"{n} samples of ~40 tokens", peak, "MiB", note=f"result kept: {kept:.1f} MiB"))


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def memory_child(n: int, device: str, dtype: torch.dtype, name: str | None = None) -> None:
    model, tok = load_model(name, dtype=dtype, device=device)
    n_layers = int(model.cfg.n_layers)
    g = torch.Generator().manual_seed(0)
    prompts = prompt_ids(tok, n)
    exchanges = [Exchange(tuple(p), tuple(torch.randint(100, 40000, (40,), generator=g).tolist())) for p in prompts]
    steered = [f"blocks.{n_layers // 2}.hook_resid_post"]
    observed = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    capture_activations(model, exchanges[:2], steered, int(tok.pad_token_id), 16, mean_hooks=observed)  # warm up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
        before = _status_kib("VmRSS") * 1024
    captured = capture_activations(model, exchanges, steered, int(tok.pad_token_id), 16, mean_hooks=observed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        after = torch.cuda.max_memory_allocated()
    else:
        after = _status_kib("VmHWM") * 1024
    kept = (sum(t.numel() for t in captured.tokens) + captured.means.numel()) * 4
    print(f"{(after - before) / 2**20:.2f} {kept / 2**20:.2f}")


class PhaseTimer:
    """Wraps a Sims's step methods with synchronised wall-clock timers, one per phase of ``Sims.step``."""

    PHASES = ("prompts", "sample", "score", "select", "capture", "fit", "guard", "evaluate")

    def __init__(self, sims: Any, sync: Callable[[], None]) -> None:
        self.seconds: dict[str, float] = {}
        for name in self.PHASES:
            setattr(sims, name, self._timed(name, getattr(sims, name), sync))

    def _timed(self, name: str, fn: Callable[..., Any], sync: Callable[[], None]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return wrapper


def iteration_phases(bench: Bench, sizes: list[tuple[int, int, int]]) -> tuple[Any, float]:
    """One SIMS iteration at each size, by phase; returns the last one's result and wall time."""
    result, total = None, 0.0
    for n, k, tokens in sizes:
        config = SimsConfig(
            iterations=1,
            prompts_per_iteration=n,
            samples_per_prompt=k,
            max_new_tokens=tokens,
            heldout_size=8,
            eval_samples_per_prompt=2,
            layers=[15],
            observe="all",
            margin=0.0,
        )
        sims = sims_from_config(config, progress=False, model=bench.model, tokenizer=bench.tokenizer)
        sims.prepare()  # the base model's held-out evaluation: once per run, not per iteration
        timer = PhaseTimer(sims, bench.sync)
        start = time.perf_counter()
        result = sims.step(1)
        total = time.perf_counter() - start
        parts = ", ".join(f"{name} {timer.seconds.get(name, 0.0):.1f}" for name in PhaseTimer.PHASES)
        other = total - sum(timer.seconds.values())
        bench.add(
            Row("SIMS iteration", f"N={n}, K={k}, {tokens} tokens", total, "s", note=f"{parts}, other {other:.1f} s")
        )
    return result, total


def observation_cost(bench: Bench, result: Any, iteration_seconds: float) -> None:
    """What observing every layer adds to one iteration: the capture's extra layers and the live analysis.

    On the iteration's own pairs: the capture with every layer observed against the steered layer
    alone (alternating), and the live analysis (metrics, separability, logit lens, figures) of
    every observed layer against that of the steered layer alone, each in a fresh run folder.
    """
    from analysis.live import LiveAnalysis  # the benchmark wires analysis in as the CLI does

    model, tok = bench.model, bench.tokenizer
    pairs = result.selection.pairs
    exchanges = [p.positive.exchange for p in pairs] + [p.negative.exchange for p in pairs]
    pad, ends = int(tok.pad_token_id), end_token_ids(tok)

    def seconds(fn: Callable[[], Any]) -> Callable[[], float]:
        def measure() -> float:  # negated: best_alternating keeps the largest
            bench.sync()
            start = time.perf_counter()
            fn()
            bench.sync()
            return start - time.perf_counter()

        return measure

    best = best_alternating(
        {
            "all": seconds(
                lambda: capture_activations(
                    model, exchanges, result.hooks, pad, 16, end_ids=ends, mean_hooks=result.activations.observed_hooks
                )
            ),
            "steered": seconds(lambda: capture_activations(model, exchanges, result.hooks, pad, 16, end_ids=ends)),
        },
        bench.repeats,
    )
    capture_extra = best["steered"] - best["all"]
    alone = dataclasses.replace(
        result.activations,
        observed_hooks=[],
        observed_positives=torch.zeros(0, 0, 0),
        observed_negatives=torch.zeros(0, 0, 0),
    )
    unobserved = dataclasses.replace(result, activations=alone)
    analysis: dict[str, float] = {}
    for name, which in (("all", result), ("steered", unobserved)):
        with tempfile.TemporaryDirectory() as folder:
            live = LiveAnalysis(folder, model=model, tokenizer=tok)
            analysis[name] = -seconds(lambda live=live, which=which: live.on_iteration(which))()
    extra = capture_extra + analysis["all"] - analysis["steered"]
    bench.add(
        Row(
            "observing every layer",
            f"{len(result.activations.observed_hooks)} layers, {len(pairs)} pairs",
            extra,
            "s",
            "the iteration",
            iteration_seconds,
            extra / iteration_seconds,
            f"capture +{capture_extra:.2f} s; analysis {analysis['all']:.2f} s vs {analysis['steered']:.2f} s",
        )
    )


def matmul_rate(bench: Bench, sampler_tokens_per_second: float) -> None:
    """The machine's 2048 x 2048 matmul rate through ``torch.mm`` and, on the CPU in float32, through
    oneDNN with a prepacked weight (what the sampler multiplies with, :mod:`sims_lens.packed_linear`);
    the ceiling takes the faster of the two."""
    dtype = next(bench.model.parameters()).dtype
    a = torch.randn(2048, 2048, device=bench.device, dtype=dtype)
    b = torch.randn(2048, 2048, device=bench.device, dtype=dtype)
    products: dict[str, Callable[[], Any]] = {"torch.mm": lambda: a @ b}
    if packing_applies(b):
        packed = torch.ops.mkldnn._reorder_linear_weight(b, 2048)
        products["oneDNN, prepacked"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    rates: dict[str, float] = {}
    for name, product in products.items():
        for _ in range(3):
            product()
        best = 0.0
        for _ in range(bench.repeats * 3):
            bench.sync()
            start = time.perf_counter()
            for _ in range(5):
                product()
            bench.sync()
            best = max(best, 5 * 2 * 2048**3 / (time.perf_counter() - start))
        rates[name] = best
        note = f"{str(dtype).removeprefix('torch.')}, {name}"
        bench.add(Row("machine", "matmul 2048x2048", best / 1e9, "GFLOP/s", note=note))
    params = sum(p.numel() for p in bench.model.parameters())  # tied unembedding counted once, used twice
    lm_head = int(bench.model.cfg.d_vocab) * int(bench.model.cfg.d_model)
    embed_tied = 1 if getattr(bench.model.cfg, "tie_word_embeddings", True) else 0
    flops_per_token = 2 * (params - lm_head * (1 - embed_tied))  # blocks + unembedding; the embedding is a lookup
    fastest = max(rates, key=rates.__getitem__)
    ceiling = rates[fastest] / flops_per_token
    bench.add(
        Row(
            "machine",
            "sampler share of matmul rate",
            sampler_tokens_per_second,
            "tokens/s",
            "matmul-bound ceiling",
            ceiling,
            sampler_tokens_per_second / ceiling,
            f"{flops_per_token / 1e9:.2f} GFLOP/token at the {fastest} rate",
        )
    )


def llama_cpp_vs_sampler(bench: Bench, args: argparse.Namespace) -> None:
    """llama.cpp's ``llama-batched-bench`` on the same GGUF, next to the sampler's greedy rows (where installed)."""
    binary = find_batched_bench()
    source = resolve_source(args.model)
    if binary is None or source.origin not in {"embedded", "gguf"} or source.path is None:
        why = "not installed (see benchmarks/llama_cpp_bench.py)" if binary is None else "the model has no GGUF"
        print(f"llama.cpp: skipped, {why}")
        return
    prompts = prompt_ids(bench.tokenizer, 64)
    prompt_tokens = round(sum(len(p) for p in prompts) / len(prompts))
    results = batched_bench(binary, source.path, [1, 16, 64], prompt_tokens, 40, torch.get_num_threads())
    ours = {int(r.case.split("batch ")[1].split(",")[0]): r.value for r in bench.rows if r.case.startswith("greedy")}
    for result in results:
        sampler = ours.get(result.batch)
        bench.add(
            Row(
                "llama.cpp (Q4_1 GGUF)",
                f"batch {result.batch}, {prompt_tokens}-token prompts, 40 tokens",
                result.tokens_per_second,
                "tokens/s",
                "sampler (float32)" if sampler else "",
                sampler,
                None if sampler is None else sampler / result.tokens_per_second,
                f"decoding alone {result.decode_tokens_per_second:.1f} tokens/s; ratio: sampler / llama.cpp",
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="the model (default: the embedded one), e.g. random:llama-3.2-1b")
    parser.add_argument(
        "--only", default="", help="comma-separated subset: sampler,llamacpp,steering,capture,memory,iteration,machine"
    )
    args = parser.parse_args()
    os.environ["SIMS_LENS_ANSWER_CACHE"] = "off"  # measure the work, never read answers back
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.memory_child:
        memory_child(args.memory_child, device, dtype, args.model)
        return
    model, tok = load_model(args.model, dtype=dtype, device=device)
    bench = Bench(model, tok, device, args.repeats)
    only = set(filter(None, args.only.split(",")))
    wanted = lambda name: not only or name in only  # noqa: E731
    print(
        f"{args.model or 'embedded model'}, {str(dtype).removeprefix('torch.')} on {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, best of {args.repeats} alternating repeats"
    )
    print(f"{'benchmark':<24} {'case':<34} {'value':>10} {'unit':<9} {'peer':<34} {'ratio':>6}  note")
    if wanted("sampler") or wanted("machine"):
        hf, _ = load_hf(resolve_source(args.model), dtype, device)  # a separate, un-bridged instance
        sampler_vs_hf(bench, hf)
        del hf
    if wanted("llamacpp"):
        llama_cpp_vs_sampler(bench, args)
    if wanted("steering"):
        steered_vs_unsteered(bench)
    if wanted("capture"):
        capture_vs_forward(bench, sample_exchanges(bench, 64))
    if wanted("memory"):
        capture_memory(bench, args)
    if wanted("iteration"):
        result, seconds = iteration_phases(bench, [(4, 2, 16), (8, 4, 24), (16, 4, 40)])
        observation_cost(bench, result, seconds)
    if wanted("machine"):
        sampler = next((r.value for r in bench.rows if r.case.startswith("greedy, batch 64")), None)
        if sampler is not None:
            matmul_rate(bench, sampler)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{device.replace(':', '')}-{str(dtype).removeprefix('torch.')}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["benchmark", "case", "value", "unit", "peer", "peer_value", "ratio", "note", "device", "dtype", "machine"]
        )
        for r in bench.rows:
            writer.writerow(
                [
                    r.benchmark,
                    r.case,
                    f"{r.value:.6g}",
                    r.unit,
                    r.peer,
                    "" if r.peer_value is None else f"{r.peer_value:.6g}",
                    "" if r.ratio is None else f"{r.ratio:.4f}",
                    r.note,
                    device,
                    str(dtype).removeprefix("torch."),
                    f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                ]
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
