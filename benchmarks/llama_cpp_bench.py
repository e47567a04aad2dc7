"""llama.cpp's batched decoding on the embedded model's own GGUF, where llama.cpp is installed.

``llama-batched-bench`` (built from llama.cpp, for example the copy vendored in the
``llama-cpp-python`` sdist: ``cmake -B build && cmake --build build --target llama-batched-bench``)
prefills B prompts of PP tokens and decodes TG tokens for each. It is found on ``PATH`` or at
``$LLAMA_BATCHED_BENCH``. :func:`batched_bench` reports, per batch size, the generated tokens per
second of the whole call (prompts included, as the sampler's figure is) and of the decoding alone.
Its kernels run the GGUF's own quantisation (Q4_1 for the embedded model), so it reads an eighth
of the bytes float32 weights take: a reference point for speed, not the same arithmetic.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ENV = "LLAMA_BATCHED_BENCH"


@dataclass(frozen=True)
class BatchedResult:
    batch: int
    prompt_tokens: int
    new_tokens: int
    seconds: float
    """The whole call: prompt processing and decoding."""
    decode_tokens_per_second: float

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of the whole call."""
        return self.batch * self.new_tokens / self.seconds


def find_batched_bench() -> Path | None:
    """``$LLAMA_BATCHED_BENCH`` or ``llama-batched-bench`` on ``PATH``; None where neither exists."""
    named = os.environ.get(ENV)
    if named:
        return Path(named) if Path(named).is_file() else None
    found = shutil.which("llama-batched-bench")
    return Path(found) if found else None


def batched_bench(
    binary: Path, gguf: Path, batches: list[int], prompt_tokens: int, new_tokens: int, threads: int
) -> list[BatchedResult]:
    """One ``llama-batched-bench`` run over ``batches``; its table parsed into :class:`BatchedResult` rows."""
    context = max(batches) * (prompt_tokens + new_tokens) + 64
    command = [
        str(binary),
        "-m",
        str(gguf),
        "-c",
        str(context),
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        str(prompt_tokens),
        "-ntg",
        str(new_tokens),
        "-npl",
        ",".join(str(b) for b in batches),
        "-t",
        str(threads),
        "-tb",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
    return parse_table(done.stdout + done.stderr)


def parse_table(text: str) -> list[BatchedResult]:
    """The rows of ``llama-batched-bench``'s Markdown table (PP, TG, B, N_KV, T_PP, S_PP, T_TG, S_TG, T, S)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 10 or not cells[0].isdigit():
            continue
        pp, tg, b = int(cells[0]), int(cells[1]), int(cells[2])
        rows.append(BatchedResult(b, pp, tg, float(cells[8]), float(cells[7])))
    return rows
