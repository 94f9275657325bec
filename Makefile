# Two commands do everything on a fresh machine: `make demo` and `make test`.
# The CPU build of torch is installed first and pinned; a plain `pip install torch` would pull
# several GB of CUDA packages.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cai tiny-model runs/tiny-model
	$(BIN)/cai generate-sl --config configs/demo.yaml
	@echo
	@echo "Done. Read the critiques and revisions with:"
	@echo "  $(BIN)/cai inspect runs/demo"
	@echo "  $(BIN)/cai inspect runs/demo --index 0"

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check cai_cli tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) runs
