#!/usr/bin/env bash
# Install what `make figures` needs for plotly's static image export (python -m analysis.make_figures):
#   - a Chrome/Chromium for kaleido to drive (scripts/install_browser.sh): Debian's `chromium`
#     (+ fonts-liberation, Arial's metrics), with apt-get, unless $BROWSER_PATH or a chromium/chrome
#     on PATH is already there
#   - kaleido (>= 1) into the project's venv (.venv, or $VENV): the `figures` extra of pyproject.toml
# kaleido finds the browser itself ($BROWSER_PATH, else chromium/chrome on PATH); it never downloads
# one. Does nothing when both are already there; apt-get needs root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
KALEIDO="kaleido>=1.5,<2" # keep in step with [project.optional-dependencies] figures in pyproject.toml

scripts/install_browser.sh

if [[ ! -x $PY ]]; then
  echo "install_figures: no $PY; run scripts/install.sh first (or make install)" >&2
  exit 1
fi
if "$PY" - "$KALEIDO" <<'EOF' 2>/dev/null; then
import importlib.metadata, sys
from packaging.requirements import Requirement
req = Requirement(sys.argv[1])
sys.exit(0 if req.specifier.contains(importlib.metadata.version(req.name)) else 1)
EOF
  echo "install_figures: $("$PY" -c 'import importlib.metadata as m; print("kaleido", m.version("kaleido"))')"
else
  echo "install_figures: pip install $KALEIDO"
  "$PY" -m pip install --disable-pip-version-check -q "$KALEIDO"
fi
