# make demo   create .venv if missing, install the project, run the whole DVC pipeline on the demo
# make test   install the test and s3 extras into the same .venv and run the test suite on 2 workers
#             (TEST_WORKERS=0 for one process; PYTEST_ARGS="-k remote" and the like pass through)
# make test-fullsize   every stage on full-size SD 1.5 architectures with random weights (~10 min on a CPU)
# make bench-extract   extract on FashionGen-sized synthetic files: images/s and peak RSS
# make bench-metrics   the metrics stage on 3,000 drawn eval images at 256 px: wall time and peak RSS
#             (needs the demo's models: make demo first)
# make bench-gpu   training and generation speed against the seed recipe, full-size random models (a GPU)
# make gpu-check   before a long GPU run: tests/test_cuda.py, bench-gpu's short mode and every stage at full
#             size, one JSON and a table, a few minutes on an H100 (ARGS=--tiny: the CPU path, tiny models)
# make studio  a local web page: baseline and LoRA side by side for an uploaded photo or sketch
# make bundle  one zip of the finished run (paths.bundle): report, metrics, LoRA weights, params, dvc.lock
# make demo-kit  pretrain the demo's tiny kit from params.yaml and write it as the shipped one
#             (stages/demo/tiny_kit.*): after changing models.pretrain or stages/demo/pretrain.py
# make wheelhouse  dist/wheelhouse/: the project's wheel and every wheel it needs but torch, for CPython
#             PYTHONS="3.11 3.12" on manylinux x86_64, and install.py: for GPU boxes without internet
#
# Plain pip on purpose: uv and poetry ignore a machine's local torch wheels and download
# several GB of CUDA torch.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Stage commands in dvc.yaml call `python`: make it the venv's.
export PATH := $(abspath $(BIN)):$(PATH)

TEST_WORKERS ?= 2
PYTEST_ARGS ?=
# 3.10 is left out: diffusers 0.42 (the project's floor) needs Python 3.11 or newer.
PYTHONS ?= 3.11 3.12

.PHONY: demo demo-kit test test-fullsize bench-extract bench-metrics bench-gpu gpu-check wheelhouse plots-template bundle studio install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --editable '.[test,s3,studio]'
	touch $@

$(VENV)/.installed-fullsize: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet --editable '.[test,s3,studio,fullsize]'
	touch $@

$(VENV)/.installed-studio: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --editable '.[studio]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/dvc repro
	@echo
	$(BIN)/dvc metrics show --json | $(BIN)/python -m json.tool
	@echo
	@$(BIN)/python -c "from stages.common.params import load_params; print('report:', load_params().paths.report)"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

demo-kit: $(VENV)/.installed
	$(BIN)/python -m stages.demo.kit

test-fullsize: $(VENV)/.installed-fullsize
	$(BIN)/python -m pytest -m fullsize -s tests/test_full_size.py

# PORT=8000 make studio. On a remote box keep it on loopback and tunnel: ssh -L 7860:127.0.0.1:7860 box.
# Any other HOST needs a token (printed) and the names it is opened by: STUDIO_ARGS='--allow-host box.lan'
studio: $(VENV)/.installed-studio
	$(BIN)/fashion-studio --host $(or $(HOST),127.0.0.1) --port $(or $(PORT),7860) $(STUDIO_ARGS)

bundle: $(VENV)/.installed
	$(BIN)/fashion-bundle

bench-extract: $(VENV)/.installed
	$(BIN)/python -m bench.extract

bench-metrics: $(VENV)/.installed
	$(BIN)/python -m bench.metrics

bench-gpu: $(VENV)/.installed-fullsize
	$(BIN)/python -m bench.gpu

# Rebuilds .dvc/plots/offline.html (vega inlined, so `dvc plots` pages draw offline); needs the npm registry.
plots-template: $(VENV)/.installed
	$(BIN)/python -m tools.offline_plots

wheelhouse: $(VENV)/.installed
	$(BIN)/python -m tools.wheelhouse --out dist/wheelhouse --python $(PYTHONS)

# From the wheelhouse on a box without internet: python -m bench.gpu_check (no make, no venv).
gpu-check: $(VENV)/.installed-fullsize
	$(BIN)/python -m bench.gpu_check $(ARGS)
