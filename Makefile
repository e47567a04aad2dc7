# The two set-up commands (see README.md):
#   make demo   install, then run SIMS on the embedded SmolLM2-135M-Instruct
#   make test   install with test tools, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
DEVICE_WHEELS ?= .device-wheels

.PHONY: demo test unit integration lint install install-dev bench device-wheels device-check figures report clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) scripts/install.sh
	touch $@

$(VENV)/.installed-dev: pyproject.toml scripts/install.sh scripts/install_browser.sh
	VENV=$(VENV) scripts/install.sh --dev
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(PY) -m sims_lens.cli demo --out $(RUN_DIR)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

unit: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not integration"

integration: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m integration

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) benchmarks/bench.py

# The GPU check (BENCHMARKS.md): download its wheels and tokenizer files here, run it on the GPU machine
device-wheels: $(VENV)/.installed
	$(PY) scripts/device_check.py wheels --folder $(DEVICE_WHEELS)

device-check:
	SIMS_LENS_WHEELS=$(abspath $(DEVICE_WHEELS)) bash scripts/device_check.sh

figures: $(VENV)/.installed
	VENV=$(VENV) scripts/install_figures.sh
	$(PY) -m analysis.make_figures $(RUN_DIR) --out figures

report: $(VENV)/.installed
	$(PY) -m sims_lens.cli report $(RUN_DIR)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
