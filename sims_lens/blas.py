"""numpy's BLAS on one thread while torch holds the cores: small linear algebra without thread fights.

torch runs its own OpenMP thread pool; numpy (and scikit-learn) call OpenBLAS, which runs a second
pool whose threads busy-wait after every call. On a machine with few cores the two pools take turns
spinning on the same cores: the separability measures of 30 layers (a few hundred SVDs, Newton
solves and small torch ops on 26 x 576 matrices) took 2.0 s with both pools and 0.6 s with
OpenBLAS on one thread (2 cores). Matrices this small gain nothing from BLAS threads, so the probe
fits (:mod:`sims_lens.steering.learners.probe`: the probe learner, the separability measures, the
HPR gate) run inside :func:`one_blas_thread` (ARCHITECTURE.md, "Threads").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from threadpoolctl import ThreadpoolController


@cache
def _controller() -> ThreadpoolController:
    """The loaded thread pools, found once (finding them costs ~1 ms; limiting them ~10 us)."""
    return ThreadpoolController()


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Limit the BLAS libraries loaded at first use (numpy's OpenBLAS...) to one thread inside the block;
    restored after, even on error."""
    with _controller().limit(limits=1, user_api="blas"):
        yield
