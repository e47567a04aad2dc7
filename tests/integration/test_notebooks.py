"""The notebooks run top to bottom on the embedded model (smoke sizes; no Jupyter needed).

Each notebook's code cells are executed in order in one namespace, with
``SIMS_LENS_NOTEBOOK_SMOKE=1`` (the notebooks shrink every size) and ``SIMS_LENS_RUN_DIR`` pointing
at a temporary folder, which 02 fills with a small run and 03 reuses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def run_notebook(path: Path) -> dict[str, Any]:
    """Execute the code cells of ``path`` in order in one fresh namespace; returns the namespace."""
    cells = json.loads(path.read_text())["cells"]
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}[cell {index}]", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("notebooks") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMS_LENS_NOTEBOOK_SMOKE", "1")
        mp.setenv("SIMS_LENS_RUN_DIR", str(run_dir))
        yield run_dir


def test_01_quickstart(smoke):
    ns = run_notebook(NOTEBOOKS / "01_quickstart.ipynb")
    assert list(ns["table"].index) == [1, 2]
    assert ns["table"]["policy reward"].notna().all()
    assert {t.name for t in ns["fig"].data} >= {"policy", "base (iteration 0)"}


def test_02_directions(smoke):
    ns = run_notebook(NOTEBOOKS / "02_directions.ipynb")
    assert ns["data"].completed_iterations == 2
    assert (smoke / "figures" / "index.html").is_file() and (smoke / "analysis_metrics.csv").is_file()
    assert set(ns["lens"]["side"]) == {"promoted", "suppressed"}


def test_03_ablations(smoke):
    ns = run_notebook(NOTEBOOKS / "03_ablations.ipynb")
    table = ns["table"]
    assert table["variant"].iloc[0] == "base" and table["win_rate_vs_base"].iloc[0] == 0.5
    assert {"all", "all x2"} <= set(table["variant"])
