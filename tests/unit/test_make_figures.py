"""The README figures' static export (analysis.make_figures): plotly's image export via kaleido + Chromium.

The rendering test needs kaleido >= 1 and a Chrome/Chromium (``scripts/install_figures.sh``); it is
skipped, with the reason, where they are missing (CI). The argument checks run everywhere.
"""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from analysis.make_figures import RendererUnavailable, find_renderer, main, make_figures, stable_svg_ids

SVG = "{http://www.w3.org/2000/svg}"
REWARDS = [0.3, 0.6, 0.7]  # not collinear: plotly.js drops the middle point of a straight line


def write_run(folder: Path) -> Path:
    """A run folder holding only ``metrics.csv``: held-out and train metrics for iterations 0-2."""
    rows = []
    for t, reward in enumerate(REWARDS):
        rows += [(t, "heldout", "reward_mean", None, reward), (t, "heldout", "perplexity_under_base", None, 8 + t)]
        rows += [(t, "heldout", "response_length", None, 40.0)]
        if t:
            rows += [(t, "heldout", "win_rate_vs_base", None, 0.6), (t, "train", "reward_mean", None, reward)]
            rows += [(t, "train", "pair_margin_mean", None, 1.0 / t)]
    folder.mkdir(parents=True)
    pd.DataFrame(rows, columns=["iteration", "split", "metric", "layer", "value"]).to_csv(
        folder / "metrics.csv", index=False
    )
    return folder


@pytest.fixture
def browser() -> str:
    try:
        return find_renderer()
    except RendererUnavailable as err:
        pytest.skip(f"static figure export unavailable: {err}")


def test_svg_and_png_export_draws_the_traces_and_title(browser, tmp_path):
    run = write_run(tmp_path / "run")
    out = tmp_path / "figures"
    written = make_figures(run, out, names=["heldout", "train"], html=False, formats=["svg", "png"])
    names = ["heldout.svg", "heldout.png", "train.svg", "train.png"]
    assert sorted(p.name for p in written) == sorted(names) and sorted(p.name for p in out.iterdir()) == sorted(names)

    root = ET.parse(out / "heldout.svg").getroot()
    assert root.tag == f"{SVG}svg" and (root.get("width"), root.get("height")) == ("960", "650")
    texts = {el.text for el in root.iter(f"{SVG}text")}
    assert {"Held-out metrics over iterations (iteration 0 = base model)", "policy", "reward_mean"} <= texts
    traces = [g for g in root.iter(f"{SVG}g") if (g.get("class") or "").startswith("trace scatter")]
    assert len(traces) == 8  # four subplots: the policy's line and the base/chance reference in each
    # The first trace is the held-out reward: three points, rising (SVG y grows downwards).
    line = next(p for p in traces[0].iter(f"{SVG}path") if p.get("class") == "js-line")
    points = [tuple(map(float, xy.split(","))) for xy in re.findall(r"[\d.]+,[\d.]+", line.get("d", ""))]
    markers = [p for p in traces[0].iter(f"{SVG}path") if p.get("class") == "point"]
    assert len(points) == len(markers) == len(REWARDS)
    assert [x for x, _ in points] == sorted(x for x, _ in points) and [y for _, y in points] == sorted(
        (y for _, y in points), reverse=True
    )

    text = (out / "heldout.svg").read_text()
    ids = {el.get("id") for el in root.iter()} - {None}
    assert "defs-fig" in ids and set(re.findall(r"url\(['\"]?#([^)'\"]+)", text)) <= ids  # stable ids, all resolve

    png = (out / "heldout.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (960, 650)


def test_argument_errors_and_a_missing_browser(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run")
    with pytest.raises(ValueError, match="unknown figure"):
        make_figures(run, tmp_path / "out", names=["nope"])
    with pytest.raises(ValueError, match="unknown format"):
        make_figures(run, tmp_path / "out", formats=["gif"])
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-browser"))
    with pytest.raises(RendererUnavailable):
        find_renderer()
    assert main([str(run), "--out", str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "out").exists()  # nothing half-written


def test_stable_svg_ids_renames_the_render_id_in_ids_and_references_only():
    svg = (
        '<svg><defs id="defs-3f0ff8"><clipPath id="clip3f0ff8xyplot"/><linearGradient id="g3f0ff8-cb0"/></defs>'
        '<g clip-path="url(#clip3f0ff8xyplot)"/><rect style="fill: url(\'#g3f0ff8-cb0\');"/><text>a3f0ff8</text></svg>'
    )
    assert stable_svg_ids(svg) == (
        '<svg><defs id="defs-fig"><clipPath id="clipfigxyplot"/><linearGradient id="gfig-cb0"/></defs>'
        '<g clip-path="url(#clipfigxyplot)"/><rect style="fill: url(\'#gfig-cb0\');"/><text>a3f0ff8</text></svg>'
    )
    assert stable_svg_ids("<svg/>") == "<svg/>"
