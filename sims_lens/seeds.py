"""Independent, reproducible random seeds for every place the run draws randomness.

A seed derived by hashing ``(seed, purpose, ...)`` never collides with another purpose's or
another iteration's (simple sums such as ``seed + iteration + batch_offset`` do), so no two
iterations or batches reuse a sampling stream by accident.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for ``parts`` (for example ``("train", iteration)``) under the run's ``seed``."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
