"""``sims-lens sweep``: a grid of whole SIMS runs (:func:`sims_lens.sweep.sweep`), then its page.

Exit status: 0 when every cell finished, 1 when some failed (they are listed; running the same
command again retries those that can succeed), 2 for a grid or option the user must fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def sweep_command(args: argparse.Namespace) -> int:
    from sims_lens.sweep import evaluate_groups, sweep

    result = sweep(
        args.grid,
        args.out,
        backend=args.backend,
        max_parallel=args.max_parallel,
        address=args.address,
        cpus_per_cell=args.cpus_per_cell,
        gpus_per_cell=args.gpus_per_cell,
        threads=args.threads,
        extend=args.extend,
        retry_failed=args.retry_failed,
    )
    table = result.table()
    print(f"\nlast finished iteration per cell (held-out; {result.folder.results_path}):")
    print(table.drop(columns="error").to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-"))
    if args.eval:
        from sims_lens.eval_runs import EvalSettings

        for folder in evaluate_groups(result, EvalSettings()):
            _eval_page(folder)
    page = _sweep_page(result.folder.path)
    if page:
        print(f"figures: {page}")
    if result.failed:
        print(f"\n{len(result.failed)} of {len(result.statuses)} cells failed:", file=sys.stderr)
        for status in result.failed:
            again = "final: --retry-failed runs it again" if status.final else "the next run retries it"
            if result.folder.log_path(status.name).is_file():
                again += f"; traceback in {result.folder.log_path(status.name)}"
            print(f"  {status.name}: {status.error} ({again})", file=sys.stderr)
        return 1
    return 0


def _sweep_page(path: Path) -> Path | None:
    try:
        from analysis.sweep_report import write_sweep_report
    except ModuleNotFoundError as err:  # sims_lens installed without the analysis package beside it
        if not (err.name or "").startswith("analysis"):
            raise
        return None
    return Path(write_sweep_report(path))


def _eval_page(folder: Path) -> None:
    try:
        from analysis.eval_report import write_eval_report
    except ImportError:
        return
    print(f"eval figures: {write_eval_report(folder)}")


def register(sub: Any) -> None:
    sweep = sub.add_parser(
        "sweep",
        help="a grid of whole SIMS runs (resumable; local or Ray); not analysis.ablations' layer sweep",
        description="Run every cell of GRID.toml (base config keys + a [factors] table) into OUT/cells/NAME.",
    )
    sweep.add_argument("grid", metavar="GRID.toml", help="config.toml keys, [factors] (key = [values]), [[exclude]]")
    sweep.add_argument("--out", required=True, help="the sweep folder (run the same command again to resume)")
    sweep.add_argument("--backend", default="local", choices=["local", "ray"])
    sweep.add_argument("--address", default=None, help="Ray: a cluster's address (auto: the one this node joined)")
    sweep.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        help="cells at once (local default 1, in this process; on 2 cores 1 is fastest); Ray: tasks in flight",
    )
    sweep.add_argument("--cpus-per-cell", type=float, default=None, help="Ray: CPUs per cell (default 1)")
    sweep.add_argument("--gpus-per-cell", type=float, default=0, help="Ray: GPUs per cell (e.g. 1)")
    sweep.add_argument("--threads", type=int, default=None, help="torch threads per cell (same in every backend)")
    sweep.add_argument("--extend", action="store_true", help="allow a grid that only adds cells to OUT")
    sweep.add_argument(
        "--retry-failed", action="store_true", help="run cells whose failure was final (bad value, guard stop) again"
    )
    sweep.add_argument("--eval", action="store_true", help="then sims-lens eval per group of cells differing in seed")
    sweep.set_defaults(func=sweep_command)
