# Developer entry points. `make test` works on a fresh machine: it creates the venv, installs the pinned
# toolchain, builds the extension and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.deps-stamp
# The `gen` extra (pyproject.toml): installed here so that the CLI tests with a tiny umT5 / Wan VAE really run.
GEN_DEPS := transformers diffusers sentencepiece imageio imageio-ffmpeg matplotlib

.PHONY: venv build test bench demo clean

$(STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" numpy pybind11 ninja pytest pytest-benchmark hypothesis safetensors $(GEN_DEPS)
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

# The built-in demo: the shipped toy generator, native vs LongLive-RAG, no downloads, under a minute on 2 CPU cores;
# artefacts in lrag_demo/.
demo: build
	$(VENV)/bin/lrag generate --demo --out lrag_demo

clean:
	rm -rf build *.egg-info lrag_ext/_C*.so lrag_ext/_build_meta.json
