# ltdiff-node: two commands on a fresh machine.
#   make demo   creates the virtual environment, installs, runs the end-to-end demo
#   make test   installs what the tests need (Debian's Orthanc and DCMTK when missing), runs them
#
# torch is installed first and pinned to the local CPU wheel (any other torch spec makes pip
# download several GB of CUDA packages); pyradiomics is source-only and needs numpy, setuptools,
# wheel and versioneer installed before it builds without build isolation.
#
# `make install` (the service install) installs the node alone: no pyradiomics, SimpleITK or
# matplotlib, which only `ltdiff-node evaluate` needs; `make install EXTRAS=evaluate` adds them,
# `make install EXTRAS=cluster` adds Dask distributed (`standardize --scheduler`), and
# `EXTRAS=evaluate,cluster` both. demo, test, lint, typecheck and bench install everything: the
# dev tools and the `evaluate` and `cluster` extras.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
comma  := ,
# Extras of `make install`, comma-separated (dev, evaluate, cluster); one stamp file per extra.
EXTRAS ?=
EXTRA_STAMPS := $(foreach e,$(subst $(comma), ,$(EXTRAS)),$(VENV)/.deps-$(e))
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make test` runs every test, the slow ones (fault suite, fuzz run) included: this is what CI
# runs. A bare `pytest` skips the slow ones; `make test PYTEST_MARKS="not slow"` does the same.
PYTEST_MARKS ?= slow or not slow

.PHONY: demo test install install-all peers lint typecheck check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.deps-node: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q .
	touch $@

$(VENV)/.deps-evaluate: $(VENV)/.deps-node
	$(BIN)/pip install -q numpy setuptools wheel versioneer
	$(BIN)/pip install -q --no-build-isolation "pyradiomics>=3.0.1"
	$(BIN)/pip install -q ".[evaluate]"
	touch $@

$(VENV)/.deps-cluster: $(VENV)/.deps-node
	$(BIN)/pip install -q ".[cluster]"
	touch $@

$(VENV)/.deps-dev: $(VENV)/.deps-node
	$(BIN)/pip install -q ".[dev]"
	touch $@

# The package itself is reinstalled (non-editable, no dependency resolution) on every run, so
# tests and demo always exercise the installed code, never the working tree by accident.
install: $(VENV)/.deps-node $(EXTRA_STAMPS)
	$(BIN)/pip install -q --no-deps --force-reinstall .

install-all: $(VENV)/.deps-node $(VENV)/.deps-dev $(VENV)/.deps-evaluate $(VENV)/.deps-cluster
	$(BIN)/pip install -q --no-deps --force-reinstall .

demo: install-all
	$(BIN)/ltdiff-node demo --out demo-output

# Real DICOM peers for the interop tests (Orthanc as the PACS, DCMTK as the modality).
peers:
	@if [ ! -x /usr/sbin/Orthanc ] || ! command -v storescu >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q orthanc dcmtk; \
	fi
	@# Debian starts an Orthanc service on install; the tests start their own on free ports.
	@if command -v systemctl >/dev/null && systemctl is-active --quiet orthanc 2>/dev/null; then \
	  systemctl stop orthanc || true; fi

test: install-all peers
	$(BIN)/pytest -m "$(PYTEST_MARKS)" $(PYTEST_ARGS)

lint: install-all
	$(BIN)/ruff check dicom_node engine training evaluation tests benchmarks
	$(BIN)/ruff format --check dicom_node engine training evaluation tests benchmarks

typecheck: install-all
	$(BIN)/mypy

check: lint typecheck test

bench: install-all
	$(BIN)/python benchmarks/bench_linear_engine.py
	$(BIN)/python benchmarks/bench_node.py
	$(BIN)/python benchmarks/bench_engine_memory.py

clean:
	rm -rf $(VENV) build *.egg-info demo-output .pytest_cache .mypy_cache .ruff_cache
