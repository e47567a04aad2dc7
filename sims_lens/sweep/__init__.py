"""Ablation grids: a base configuration crossed with factor values, each cell a whole SIMS run.

``sweep(grid, out=...)`` (and ``sims-lens sweep GRID.toml --out DIR``) runs every cell into
``DIR/cells/NAME/``, an ordinary run folder, and keeps ``DIR/results.csv`` tidy across cells.
Not to be confused with :func:`analysis.ablations.layer_sweep`, which varies one finished policy
(which layers it steers); a sweep here varies whole runs.
"""

from sims_lens.sweep.driver import SweepResult, evaluate_groups, sweep
from sims_lens.sweep.folder import CellStatus, SweepError, SweepFolder
from sims_lens.sweep.grid import Cell, Grid, GridError, load_grid

__all__ = [
    "Cell",
    "CellStatus",
    "Grid",
    "GridError",
    "SweepError",
    "SweepFolder",
    "SweepResult",
    "evaluate_groups",
    "load_grid",
    "sweep",
]
