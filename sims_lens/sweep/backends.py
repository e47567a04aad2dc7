"""Where a sweep's cells run: one after another in this process, in worker processes, or as Ray tasks.

Each backend takes the jobs and yields each :class:`~sims_lens.sweep.cell.CellOutcome` as its cell
finishes (in finishing order), calling ``started(name)`` when a cell is handed out. All of them run
the same :func:`~sims_lens.sweep.cell.run_cell`, with the thread count each job carries. Closing
the generator early (an error in the driver, Ctrl-C) stops the cells still running.

- ``local``, one at a time: in this process; consecutive cells share the loaded model. On a
  2-core machine this is the fastest: two torch processes on two cores slow each other down.
- ``local`` with ``max_parallel = N``: each cell in its own spawned process, N at once, so a cell
  that dies (the kernel's out-of-memory killer) takes no other cell with it. Each process loads the
  model. A worker dies with the sweep (Linux), or stops its cell at its next phase (elsewhere);
  a worker killed outright is reported with the signal.
- ``ray``: each cell a Ray task (``cpus``/``gpus`` per cell) on a local instance or the cluster at
  ``address``, as many at once as the cluster fits; a task whose worker is lost is retried once.
  Cell folders must be on a file system every node sees.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Generator, Sequence
from contextlib import suppress
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from sims_lens.sweep.cell import CellJob, CellOutcome, error_line, run_cell
from sims_lens.sweep.folder import SweepError

BACKENDS = ("local", "ray")
RAY_INSTALL = "pip install 'sims-lens[ray]' (or pip install ray)"

Started = Callable[[str], None]
Outcomes = Generator[CellOutcome, None, None]


def run_local(jobs: Sequence[CellJob], started: Started) -> Outcomes:
    """Cells one after another in this process."""
    for job in jobs:
        started(job.name)
        yield run_cell(job)


def run_processes(jobs: Sequence[CellJob], started: Started, max_parallel: int) -> Outcomes:
    """Each cell in its own spawned process, at most ``max_parallel`` at once."""
    context = get_context("spawn")  # no forked torch state; the same start on every platform
    queue = list(jobs)
    running: dict[Connection, tuple[Any, CellJob]] = {}
    try:
        while queue or running:
            while queue and len(running) < max_parallel:
                job = queue.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_worker, args=(job, os.getpid(), sender))
                process.start()
                sender.close()  # the child's end: EOF here once the child is gone
                running[receiver] = (process, job)
                started(job.name)
            for ready in wait(list(running)):
                receiver = cast(Connection, ready)
                process, job = running.pop(receiver)
                try:
                    outcome: CellOutcome = receiver.recv()
                except EOFError:  # the process died without an answer
                    outcome = lost(job, f"worker lost: its process {_ended(process)}")
                receiver.close()
                _reap(process)
                yield outcome
    finally:  # closed early (an error in the driver, Ctrl-C): stop the cells still running
        for process, _ in running.values():
            process.terminate()
        for receiver, (process, _) in running.items():
            _reap(process)
            receiver.close()


def run_ray(
    jobs: Sequence[CellJob],
    started: Started,
    *,
    address: str | None = None,
    max_parallel: int | None = None,
    cpus: float = 1,
    gpus: float = 0,
) -> Outcomes:
    """Cells as Ray tasks, collected as they finish. Starts (and stops) a local instance unless Ray is
    already initialised or ``address`` names a cluster (``auto``: the one this node joined)."""
    ray = import_ray()
    ours = not ray.is_initialized()
    if ours:  # workers import what the driver can: its working folder goes on their PYTHONPATH
        path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": {"PYTHONPATH": path}},
            )
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise SweepError(
                f"cannot start or reach Ray at --address {address or '(local)'}: {error_line(err)}"
            ) from None
    running: dict[Any, CellJob] = {}
    try:
        capacity = ray_capacity(ray, cpus, gpus)  # also refuses a cell the cluster can never fit
        limit = max_parallel or capacity
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=1)(_ray_cell)
        queue = list(jobs)
        while queue or running:
            while queue and len(running) < limit:
                job = queue.pop(0)
                running[task.remote(job)] = job
                started(job.name)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                job = running.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as err:  # lost twice, out of memory, cancelled
                    yield lost(job, f"Ray: {error_line(err)}")
    finally:
        for ref in running:
            with suppress(Exception):  # the connection may be what failed; shutdown still runs
                ray.cancel(ref, force=True)
        if ours:
            ray.shutdown()


def ray_capacity(ray: Any, cpus: float, gpus: float) -> int:
    """How many cells the cluster runs at once; a cell the cluster can never fit raises SweepError."""
    total = ray.cluster_resources()
    fits = [total.get("CPU", 0) / cpus] + ([total.get("GPU", 0) / gpus] if gpus else [])
    if min(fits) < 1:
        raise SweepError(
            f"a cell asks for {cpus:g} CPU(s) and {gpus:g} GPU(s) but the Ray cluster has {total.get('CPU', 0):g} "
            f"CPU(s) and {total.get('GPU', 0):g} GPU(s); lower --cpus-per-cell / --gpus-per-cell or add nodes"
        )
    return int(min(fits))


def lost(job: CellJob, error: str) -> CellOutcome:
    """The outcome of a cell whose worker vanished."""
    return CellOutcome(job.name, "failed", 0.0, job.threads, error)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError(f"--backend ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def _worker(job: CellJob, parent: int, sender: Connection) -> None:
    """A worker process: one cell, its outcome sent back through the pipe."""
    _die_with_parent()
    if os.getppid() != parent:  # the sweep died before the signal was armed
        os._exit(1)
    sender.send(run_cell(job, parent))
    sender.close()


def _reap(process: Any, timeout: float = 30) -> None:
    """Wait for a worker to exit (a lingering thread can keep it alive: then it is killed)."""
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()


def _ended(process: Any) -> str:
    process.join()
    code = process.exitcode
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name} (out of memory?)"
    return f"ended with exit code {code}"


def _ray_cell(job: CellJob) -> CellOutcome:
    """A Ray task: the cell, with the task's id recorded (the proof it ran as a task). A retry on
    another node finds the lost worker's lock: it is dropped when that node is no longer alive."""
    import ray

    from sims_lens.run_folder import RunFolder

    alive = {node["NodeManagerHostname"] for node in ray.nodes() if node.get("Alive")}
    RunFolder(job.folder).drop_lock_of_other_host(unless=alive)
    outcome = run_cell(job)
    outcome.task_id = ray.get_runtime_context().get_task_id()
    return outcome


def _die_with_parent() -> None:
    """In a worker process: be killed when the sweep process dies (Linux), so no orphan holds a cell."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
