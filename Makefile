# Two entry points: `make demo` and `make test`. Both set up .venv on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# A bare `torch` requirement would pull a multi-GB CUDA build; pin the CPU build first.
TORCH   ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install bench bench-gpu docs sample clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/empg score sample_data/rollouts.parquet --overwrite
	$(BIN)/empg plot dynamics sample_data/rollouts.scored.parquet --out-dir plots
	$(BIN)/empg audit sample_data/rollouts.scored.parquet --top 3
	$(BIN)/empg report sample_data/rollouts.scored.parquet -o report.html --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -n 2

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-gpu: $(STAMP)
	$(BIN)/python bench/run.py --gpu

sample: $(STAMP)
	$(BIN)/python examples/make_sample.py --seed 0 --out sample_data

docs: $(STAMP)
	$(BIN)/python docs/cli_reference.py

clean:
	rm -rf $(VENV) plots sample_data/rollouts.scored.parquet report.html
