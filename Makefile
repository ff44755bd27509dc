# `make demo` runs the quickstart; `make test` runs lint, types and the test suite. Each creates
# the virtual environment (.venv) from the project's own files first. `make test-container` builds
# the image and runs docker compose end to end (tests/container/): it needs root and apt, which it
# uses to install and start a Docker engine when none answers. The constraints file pins
# torch to the CPU wheel this machine (and CI) has on disk; pyproject.toml keeps an open range.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-lm test lint install test-container wheelhouse images gpu-check

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/student-client demo

# The language-model quickstart: the default sequence teacher (trained on first use), a small LM
# student on hard next-token labels vs distilled from the teacher's top-k, held-out perplexity.
demo-lm: $(STAMP)
	$(BIN)/student-client demo-lm

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy protocol teacher_server student_client
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

# The wheels an offline image build installs (docker build --build-arg PIP_OFFLINE=true).
wheelhouse:
	scripts/fill_wheelhouse.sh

# A Docker engine, and base images made from Debian's packages (no registry needed).
images:
	scripts/docker_engine.sh
	scripts/local_images.sh

test-container: $(STAMP) images wheelhouse
	$(BIN)/python -m pytest --container -v -s tests/container

# On a machine with an NVIDIA GPU: a CUDA torch in .venv-gpu, the engine check and the CUDA
# benchmarks (throughput, sequence, per-request cost) in under 8 minutes, JSON + summary.md in
# runs/gpu-check-<time>/ (scripts/gpu_check.sh; --dry-run prints the plan).
gpu-check:
	scripts/gpu_check.sh
