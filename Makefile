# Two commands for a fresh machine:  `make quickstart` (base eval -> mine -> fine-tune -> export + eval) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
EXTRAS ?= cpu,dev,bench,tensorboard
STAMP := $(VENV)/.nvr-installed

.PHONY: venv quickstart test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

# base eval -> `nvr fit --config configs/fit/quickstart_minilm_cranfield.yaml` -> export + eval; ARGS go to fit
quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/nvr quickstart $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check nvr tests benchmarks

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/mine_vs_st.py

clean:
	rm -rf $(VENV) .nvr_cache runs
