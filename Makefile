# Developer entry points. `make test` works on a fresh machine: it creates the venv, installs the pinned
# toolchain, builds the extension and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.deps-stamp

.PHONY: venv build test bench clean

$(STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" numpy pybind11 ninja pytest pytest-benchmark hypothesis safetensors
	touch $(STAMP)

venv: $(STAMP)

# Editable install; ninja rebuilds only the sources that changed.
build: $(STAMP)
	$(PIP) install -q --no-build-isolation -e .

# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
test: build
	$(PY) -m pytest -q tests; rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests: failing"; exit $$rc

bench: build
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf build *.egg-info lrag_ext/_C*.so lrag_ext/_build_meta.json
