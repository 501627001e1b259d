# Two commands on a fresh machine: `make demo` and `make test`. Both install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT := checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
# The versions the suite passed with (`make lock` writes it from .venv); `make setup` installs exactly these.
LOCK := requirements-cpu.lock
LOCKED = $(shell sed -n 's/^$(1)==//p' $(LOCK))
# Without a CUDA device, install PyTorch's CPU build before anything else pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==$(call LOCKED,torch)
# Locked distributions that only the PEFT export's tests import. They go into $(TEST_ONLY_DIR), off the interpreter's
# path, because torchmetrics imports transformers whenever it is installed: 2-3 s more in every Python process that
# imports Lightning or LitGPT, of which the suite starts dozens. tests/conftest.py puts the folder on pytest's path.
TEST_ONLY := transformers|peft|accelerate
TEST_ONLY_DIR := $(VENV)/test-only

.PHONY: setup demo test clean lock upgrade

setup: $(VENV)/.installed $(CHECKPOINT)/lit_model.pth

# Every distribution at the lock's version, none resolved anew (--no-deps: the lock is the whole closure), the
# package itself built with the locked setuptools. With a CUDA device, torch comes with its CUDA libraries first.
$(VENV)/.installed: pyproject.toml setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "pip==$(call LOCKED,pip)"
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch==$(call LOCKED,torch)"; \
	else $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	grep -viE '^($(TEST_ONLY))==' $(LOCK) > $(VENV)/lock-main.txt
	grep -iE '^($(TEST_ONLY))==' $(LOCK) > $(VENV)/lock-test-only.txt
	$(PY) -m pip install -q --no-deps -r $(VENV)/lock-main.txt
	$(PY) -m pip uninstall -q -y $(subst |, ,$(TEST_ONLY))  # after `make upgrade`, which installs them in .venv
	rm -rf $(TEST_ONLY_DIR)
	$(PY) -m pip install -q --no-deps --target $(TEST_ONLY_DIR) -r $(VENV)/lock-test-only.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(CHECKPOINT)/lit_model.pth: $(VENV)/.installed
	$(PY) -m litgpt_plop.prepare --checkpoint_dir $(CHECKPOINT)

demo: setup
	$(PY) -m litgpt_plop.demo

test: setup
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) out

# Refreshing the lock: `make upgrade` (the newest versions pyproject.toml's ranges allow, into .venv), `make test`,
# then `make lock` once the suite passes, and commit requirements-cpu.lock.
upgrade: $(VENV)/.installed
	$(PY) -m pip install -q --upgrade --upgrade-strategy eager pip setuptools -e ".[test,demo]"

# .venv as it is (its test-only folder included), every distribution but this package, local version labels (torch's
# +cpu) dropped: the same lock serves a CPU build and a CUDA build of one torch release. Staged, then renamed.
FREEZE := $(PY) -m pip freeze --all
lock:
	{ echo "# The versions the suite passed with on CPU, Python $$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')."; \
	  echo "# Written by \`make lock\` from .venv; \`make setup\` installs exactly these (pip install --no-deps -r)."; \
	  { $(FREEZE) --exclude-editable; if [ -d $(TEST_ONLY_DIR) ]; then $(FREEZE) --path $(TEST_ONLY_DIR); fi; } \
	    | grep -viE '^(litgpt[-_]plop)(==| @)' | sed -E 's/^([^=]+==[^+]+)\+.*/\1/' | LC_ALL=C sort -s -f -t= -k1,1 -u; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

# The GPU machine's wheel kit (issue #18): wheels for its Python 3.12 that it lacks, at the lock's versions,
# bitsandbytes slimmed to the CUDA 13.0 and CPU libraries, SmolLM2's tokenizer files; into wheelkit/ (git-ignored),
# for a device run to carry. pycosat has no wheel and is built from its sdist by a Python 3.12: python3.12 on PATH
# or pyenv's, or GPU_KIT_PYTHON.
.PHONY: gpu-kit
gpu-kit: setup
	$(PY) -m benchmarks.gpu_kit $(if $(GPU_KIT_PYTHON),--target_python $(GPU_KIT_PYTHON))
