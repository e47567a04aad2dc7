"""Every notebook runs top to bottom in a real Jupyter kernel on the embedded model (smoke sizes).

Each notebook is executed by ``nbclient`` in its own ``python3`` kernel (ipykernel installed in
this venv: the kernelspec's ``python`` is this interpreter, which the probe checks), with the
working directory ``notebooks/``. The kernel inherits ``SIMS_LENS_NOTEBOOK_SMOKE=1`` (the notebooks
shrink every size) and ``SIMS_LENS_RUN_DIR`` (a temporary folder, which 02 fills with a small run
and 03 reuses). A cell that raises fails the test with its traceback. The test appends one probe
cell to the notebook it runs (in memory; the file is not changed), which prints a JSON summary of
the notebook's results; the assertions read that output and the figure outputs of the cells.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
MARK = "NOTEBOOK-SUMMARY "
PLOTLY = "application/vnd.plotly.v1+json"

PROBES = {
    "01_quickstart.ipynb": """
summary = {
    "iterations": [int(i) for i in table.index],
    "policy_reward": [float(v) for v in table["policy reward"]],
    "base_reward": [float(v) for v in table["base reward"]],
    "pairs": [int(v) for v in table["pairs"]],
    "traces": sorted({t.name for t in fig.data}),
    "steered": steered,
    "unsteered": unsteered,
    "oracle": sims.config.oracle,
}
""",
    "02_directions.ipynb": """
summary = {
    "completed": data.completed_iterations,
    "lens_sides": sorted(set(lens["side"])),
}
""",
    "03_ablations.ipynb": """
summary = {
    "variants": [str(v) for v in table["variant"]],
    "first_win_rate": float(table["win_rate_vs_base"].iloc[0]),
    "rewards": [float(v) for v in table["reward_mean"]],
}
""",
    "04_your_own_pairs.ipynb": """
summary = {
    "pair_hooks": steering.hooks,
    "pair_norms": steering.norms(),
    "answers": answers,
    "cosines": cosines.to_dict(orient="records"),
}
""",
}


def execute(name: str) -> tuple[Any, dict[str, Any]]:
    """Run notebook ``name`` in a fresh kernel, plus the probe; the executed notebook and the probe's summary."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    probe = (
        "import json as _json, sys as _sys\n"
        + PROBES[name]
        + f"summary['python'] = [_sys.executable, _sys.prefix]\nprint({MARK!r} + _json.dumps(summary))\n"
    )
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
    line = next(row for row in text.splitlines() if row.startswith(MARK))
    summary = json.loads(line[len(MARK) :])
    # the kernel ran this venv's interpreter (the one with sims_lens installed), not some other python
    assert summary["python"] == [sys.executable, sys.prefix], summary["python"]
    return nb, summary


def plotly_outputs(nb: Any) -> int:
    """How many cell outputs of ``nb`` are plotly figures."""
    return sum(PLOTLY in o.get("data", {}) for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)


def finite(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("notebooks") / "run"
    with pytest.MonkeyPatch.context() as mp:  # set before each kernel starts: the kernel inherits them
        mp.setenv("SIMS_LENS_NOTEBOOK_SMOKE", "1")
        mp.setenv("SIMS_LENS_RUN_DIR", str(run_dir))
        yield run_dir


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(PROBES)


def test_01_quickstart(smoke):
    nb, s = execute("01_quickstart.ipynb")
    assert s["iterations"] == [1, 2]
    assert finite(s["policy_reward"]) and finite(s["base_reward"])
    assert all(-1 <= r <= 1 for r in s["policy_reward"])  # VADER compound scores
    assert all(n >= 1 for n in s["pairs"])
    assert s["oracle"] == "python:oracle warmth"  # the notebook's own function was the oracle
    assert {"policy", "base (iteration 0)"} <= set(s["traces"])
    assert len(s["steered"]) == len(s["unsteered"]) == 2 and all(s["steered"])
    assert s["steered"] != s["unsteered"]  # the policy changed what the model says
    assert plotly_outputs(nb) >= 1


def test_02_directions(smoke):
    nb, s = execute("02_directions.ipynb")
    assert s["completed"] == 2
    assert (smoke / "figures" / "index.html").is_file() and (smoke / "analysis_metrics.csv").is_file()
    assert len(list((smoke / "figures").glob("*.html"))) > 1
    assert s["lens_sides"] == ["promoted", "suppressed"]
    assert plotly_outputs(nb) >= 5


def test_03_ablations(smoke):
    nb, s = execute("03_ablations.ipynb")
    assert s["variants"][0] == "base" and s["first_win_rate"] == 0.5
    assert {"all", "all x2"} <= set(s["variants"])
    assert finite(s["rewards"])
    assert plotly_outputs(nb) >= 2


def test_04_your_own_pairs(smoke):
    _, s = execute("04_your_own_pairs.ipynb")
    hooks = ["blocks.9.hook_resid_post", "blocks.15.hook_resid_post"]
    assert s["pair_hooks"] == hooks
    assert all(math.isfinite(n) and n > 0 for n in s["pair_norms"].values())
    assert set(s["answers"]) == {"unsteered", "x0.5", "x1"}
    assert s["answers"]["x1"] != s["answers"]["unsteered"]
    rows = s["cosines"]
    assert [(r["iteration"], r["layer"]) for r in rows] == [(1, 9), (1, 15)]
    for r in rows:
        for key in ("cos(fit_pairs, SIMS fit)", "cos(fit_pairs, SIMS policy)"):
            assert -1 <= r[key] <= 1 and math.isfinite(r[key])
        assert math.isfinite(r["SIMS held-out reward"])
