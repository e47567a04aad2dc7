"""Where a sweep's cells run: one after another in this process, in worker processes, or as Ray tasks.

Each backend takes the jobs and yields each :class:`~sims_lens.sweep.cell.CellOutcome` as its cell
finishes (in finishing order), calling ``started(name)`` when a cell is handed out. All of them run
the same :func:`~sims_lens.sweep.cell.run_cell`, with the thread count each job carries.

- ``local`` with ``max_parallel = 1``: in this process; consecutive cells share the loaded model.
  On a 2-core machine this is the fastest: two torch processes on two cores slow each other down.
- ``local`` with ``max_parallel = N``: N worker processes (spawned), each loading the model once;
  a worker dies with the sweep (Linux), or stops its cell at the next phase (elsewhere).
- ``ray``: each cell a Ray task (``cpus``/``gpus`` per cell), on a local instance or the cluster at
  ``address``; a task whose worker is lost is retried once. Cell folders must be on a file system
  every node sees.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any

from sims_lens.sweep.cell import CellJob, CellOutcome, error_line, run_cell

BACKENDS = ("local", "ray")
RAY_INSTALL = "pip install 'sims-lens[ray]' (or pip install ray)"

Started = Callable[[str], None]


class SweepError(ValueError):
    """A sweep cannot start as asked (a backend missing, an option out of range); the message says the fix."""


def run_local(jobs: Sequence[CellJob], started: Started) -> Iterator[CellOutcome]:
    """Cells one after another in this process."""
    for job in jobs:
        started(job.name)
        yield run_cell(job)


def run_processes(jobs: Sequence[CellJob], started: Started, max_parallel: int) -> Iterator[CellOutcome]:
    """Cells in ``max_parallel`` spawned worker processes; at most that many at once.

    A worker that dies (the kernel's out-of-memory killer, a segfault) breaks its pool: the cells
    running there are recorded as lost (the next run retries them) and a new pool takes the rest.
    """
    context = get_context("spawn")  # no forked torch state; the same start on every platform
    parent = os.getpid()
    queue = list(jobs)
    while queue:
        with ProcessPoolExecutor(max_parallel, mp_context=context, initializer=_die_with_parent) as pool:
            running: dict[Future[CellOutcome], CellJob] = {}
            broken = False
            while running or (queue and not broken):
                while queue and not broken and len(running) < max_parallel:
                    job = queue.pop(0)
                    running[pool.submit(run_cell, job, parent)] = job
                    started(job.name)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    try:
                        yield future.result()
                    except Exception as err:  # the worker died: its pool is broken
                        broken = broken or isinstance(err, BrokenProcessPool)
                        yield CellOutcome(job.name, "failed", 0, 0.0, job.threads, f"worker lost: {error_line(err)}")


def run_ray(
    jobs: Sequence[CellJob],
    started: Started,
    *,
    address: str | None = None,
    max_parallel: int | None = None,
    cpus: float = 1,
    gpus: float = 0,
) -> Iterator[CellOutcome]:
    """Cells as Ray tasks; results are collected as they finish. Starts (and stops) a local instance
    unless Ray is already initialised or ``address`` names a cluster (``auto``: the one this node joined)."""
    ray = import_ray()
    ours = not ray.is_initialized()
    if ours:  # workers import what the driver can: its working folder goes on their PYTHONPATH
        path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=1)(_ray_cell)
        queue = list(jobs)
        running: dict[Any, CellJob] = {}
        while queue or running:
            while queue and (max_parallel is None or len(running) < max_parallel):
                job = queue.pop(0)
                running[task.remote(job)] = job
                started(job.name)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                job = running.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as err:  # lost twice, out of memory, cancelled
                    yield CellOutcome(job.name, "failed", 0, 0.0, job.threads, f"Ray: {error_line(err)}")
    finally:
        if ours:
            ray.shutdown()


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError(f"--backend ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def _ray_cell(job: CellJob) -> CellOutcome:
    """A Ray task: the cell, with the task's id recorded (the proof it ran as a task)."""
    import ray

    outcome = run_cell(job)
    outcome.task_id = ray.get_runtime_context().get_task_id()
    return outcome


def _die_with_parent() -> None:
    """In a worker process: be killed when the sweep process dies (Linux), so no orphan holds a cell."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
