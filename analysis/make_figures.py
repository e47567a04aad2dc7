"""Write the README figures of a run as static files: ``NAME.svg`` (or ``.png``/``.pdf``) and ``NAME.html``.

    python -m analysis.make_figures RUN_DIR --out figures/     # or: make figures RUN_DIR=...

The static images are plotly's own image export: kaleido (>= 1, the optional ``figures`` extra)
draws each figure with plotly.js in a headless Chrome/Chromium, so they look like the interactive
pages, every trace type included. kaleido never downloads a browser here; the one it drives is
``$BROWSER_PATH`` if set, else what its browser driver (choreographer) finds: ``chrome`` or
``chromium`` on ``PATH``, e.g. Debian's ``/usr/bin/chromium``. ``scripts/install_figures.sh``
installs both (``make figures`` runs it). No network is used: plotly.js comes from the installed
plotly package and MathJax is off.

The HTML pages load a ``plotly.min.js`` written once next to them (they open offline).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import plotly.graph_objects as go

from analysis.figures import FIGURES, build_figures
from analysis.pages import write_figure
from analysis.run_data import load_run

WIDTH, HEIGHT = 960, 480
"""Image size in layout pixels when a figure's layout sets none."""
FORMATS = ("svg", "png", "pdf")
INSTALL_HINT = "run scripts/install_figures.sh (Debian's chromium + kaleido into the venv)"


class RendererUnavailable(RuntimeError):
    """Static export cannot run here: kaleido >= 1 or a Chrome/Chromium is missing."""


def find_renderer() -> str:
    """The browser kaleido will drive, after checking that kaleido >= 1 is installed.

    ``$BROWSER_PATH`` wins; otherwise choreographer's own search (``chrome``/``chromium`` on
    ``PATH`` and the usual install paths). Raises :class:`RendererUnavailable` with the reason.
    """
    try:
        version = importlib.metadata.version("kaleido")
    except importlib.metadata.PackageNotFoundError:
        raise RendererUnavailable(f"kaleido is not installed; {INSTALL_HINT}") from None
    if int(version.split(".")[0]) < 1:
        raise RendererUnavailable(f"kaleido {version} is too old (need >= 1); {INSTALL_HINT}")
    from choreographer.browsers.chromium import Chromium

    path = os.environ.get("BROWSER_PATH") or Chromium.find_browser(skip_local=False)
    if not path:
        raise RendererUnavailable(f"no Chrome/Chromium found for kaleido; {INSTALL_HINT}, or set BROWSER_PATH")
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        raise RendererUnavailable(f"browser {path} (BROWSER_PATH?) is not an executable file")
    return str(path)


def export_static(figures: Mapping[Path, go.Figure], browser: str | None = None, scale: float = 1.0) -> list[Path]:
    """Write each figure to its path, the format taken from the suffix, in one browser session.

    Calls kaleido directly rather than ``plotly.io.write_images`` (its thin wrapper) to name the
    browser, switch MathJax off (plotly would load it from a CDN) and raise on a failed image
    (``write_images`` drops kaleido's errors). The size is the layout's, else ``WIDTH x HEIGHT``.
    SVG ids are made stable (see :func:`stable_svg_ids`), so an unchanged figure gives the same bytes.
    """
    import kaleido

    browser = browser or find_renderer()
    specs = []
    for path, fig in figures.items():
        fmt = path.suffix.lstrip(".").lower()
        if fmt not in FORMATS:
            raise ValueError(f"{path}: unknown image format {fmt!r}; known: {list(FORMATS)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        size = {"width": int(fig.layout.width or WIDTH), "height": int(fig.layout.height or HEIGHT)}
        spec = fig.to_dict()
        for i, trace in enumerate(spec.get("data", [])):
            trace.setdefault("uid", str(i))  # plotly.js names the trace's SVG group after it (else random)
        specs.append({"fig": spec, "path": path, "opts": {"format": fmt, "scale": scale, **size}})
    kaleido.write_fig_from_object_sync(specs, kopts={"path": browser, "mathjax": False}, cancel_on_error=True)
    for path in figures:
        if path.suffix.lower() == ".svg":
            path.write_text(stable_svg_ids(path.read_text(encoding="utf-8")), encoding="utf-8")
    return list(figures)


def stable_svg_ids(svg: str) -> str:
    """Replace the random id plotly.js gives each render (``defs-3f0ff8``, ``clip3f0ff8xyplot``) by ``fig``."""
    match = re.search(r'<defs id="defs-([0-9a-z]+)"', svg)
    return re.sub(rf"((?:id=\"|url\(['\"]?#)[A-Za-z-]*){match.group(1)}", r"\1fig", svg) if match else svg


def make_figures(
    run_dir: str | Path,
    out: str | Path,
    names: Sequence[str] | None = None,
    html: bool = True,
    formats: Sequence[str] = ("svg",),
    scale: float = 1.0,
) -> list[Path]:
    """Write the figures ``names`` (default: all of :data:`FIGURES`) of ``run_dir`` into ``out``."""
    unknown = sorted(set(names or ()) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; known: {sorted(FIGURES)}")
    bad = sorted(set(formats) - set(FORMATS))
    if bad:
        raise ValueError(f"unknown format(s) {bad}; known: {list(FORMATS)}")
    browser = find_renderer() if formats else None  # fail before writing anything
    data = load_run(run_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    static: dict[Path, go.Figure] = {}
    for name, fig in build_figures(data).items():
        if names and name not in names:
            continue
        if html:
            written.append(write_figure(fig, out / f"{name}.html"))
        static.update({out / f"{name}.{fmt}": fig for fmt in dict.fromkeys(formats)})
    if static:
        written += export_static(static, browser, scale)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.make_figures", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder (made by 'sims-lens run' or 'sims-lens demo')")
    parser.add_argument("--out", default="figures", help="where to write the files (default: figures/)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME", help=f"one of {sorted(FIGURES)}")
    parser.add_argument("--no-html", action="store_true", help="write the static images only")
    parser.add_argument("--format", action="append", choices=FORMATS, help="image format, repeatable (default: svg)")
    parser.add_argument("--scale", type=float, default=1.0, help="pixel scale of PNG images (default: 1)")
    args = parser.parse_args(argv)
    try:
        written = make_figures(
            args.run_dir, args.out, args.only, html=not args.no_html, formats=args.format or ["svg"], scale=args.scale
        )
    except (ValueError, FileNotFoundError, RendererUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
