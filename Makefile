# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: an unpinned torch resolves to a multi-GB CUDA build. Override for a GPU build, e.g.
# `make install TORCH=torch==2.11.0`; an already installed torch is kept.
TORCH ?= torch==2.13.0

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"

demo: install
	OMP_NUM_THREADS=1 $(BIN)/python recipes/demo.py --threads 1

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info outputs
