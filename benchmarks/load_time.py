"""How long loading the embedded model takes once its dequantised cache exists.

Prints the import time of transformers + TransformerLens and the time of ``load_model()`` itself
(cached safetensors -> Hugging Face model -> TransformerBridge), best of a few loads in one process.

    python benchmarks/load_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    import transformer_lens.model_bridge  # noqa: F401
    import transformers  # noqa: F401

    from sims_lens.models import cached_folder_for, embedded_gguf_path, load_model

    imports = time.perf_counter() - start
    start = time.perf_counter()
    cached_folder_for(embedded_gguf_path())  # builds the cache on the very first run
    first = time.perf_counter() - start
    loads = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        load_model()
        loads.append(time.perf_counter() - start)
    print(f"imports (transformers, TransformerLens): {imports:.2f} s")
    print(f"cache check / build:                     {first:.2f} s")
    print(f"load_model() from the cache:             best {min(loads):.2f} s, first {loads[0]:.2f} s")


if __name__ == "__main__":
    main()
