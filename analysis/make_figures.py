"""Write the README figures of a run as static files: ``NAME.html`` (interactive) and ``NAME.svg``.

    python -m analysis.make_figures RUN_DIR --out figures/

The HTML pages load a ``plotly.min.js`` written once next to them (they open offline); the SVGs are
drawn by :mod:`analysis.svg` (plotly's own PNG/SVG export needs kaleido and a browser).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from analysis.figures import FIGURES, build_figures, write_figure
from analysis.run_data import load_run
from analysis.svg import figure_to_svg


def make_figures(
    run_dir: str | Path, out: str | Path, names: Sequence[str] | None = None, html: bool = True
) -> list[Path]:
    """Write the figures ``names`` (default: all of :data:`FIGURES`) of ``run_dir`` into ``out``."""
    unknown = sorted(set(names or ()) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; known: {sorted(FIGURES)}")
    data = load_run(run_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in build_figures(data).items():
        if names and name not in names:
            continue
        if html:
            written.append(write_figure(fig, out / f"{name}.html"))
        svg = out / f"{name}.svg"
        svg.write_text(figure_to_svg(fig), encoding="utf-8")
        written.append(svg)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.make_figures", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder (made by 'sims-lens run' or 'sims-lens demo')")
    parser.add_argument("--out", default="figures", help="where to write the files (default: figures/)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME", help=f"one of {sorted(FIGURES)}")
    parser.add_argument("--no-html", action="store_true", help="write the SVGs only")
    args = parser.parse_args(argv)
    try:
        written = make_figures(args.run_dir, args.out, args.only, html=not args.no_html)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
