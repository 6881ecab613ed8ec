# Two entry points: `make demo` and `make test`. Both set up .venv on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# A bare `torch` requirement would pull a multi-GB CUDA build; pin the CPU build first.
TORCH   ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install bench bench-engines bench-gpu bench-verl docs sample clean

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
	$(BIN)/python bench/convert.py

# the Ray engine on 1 and 2 CPU workers vs the local engine, and a resumed run: the Engines section of RESULTS.md
bench-engines: $(STAMP)
	$(BIN)/python bench/engines.py

bench-gpu: $(STAMP)
	$(BIN)/python bench/run.py --gpu

# verl is never a dependency of empg: bench/.venv-verl (ignored) holds verl and the few packages its core_algos
# imports, and sees this project's environment (torch, polars, empg) through a .pth file.
VERL_VENV := bench/.venv-verl
VERL_PKGS := verl==0.9.1 tensordict==0.15.3 pyvers==0.2.3 cloudpickle==3.1.3 omegaconf==2.4.0 codetiming==1.4.0 \
             orjson==3.13.0
$(VERL_VENV)/.installed: $(STAMP)
	$(BIN)/python -m venv $(VERL_VENV)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	    "$$($(VERL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/empg-project.pth"
	$(VERL_VENV)/bin/pip install -q --no-deps $(VERL_PKGS)
	touch $@

bench-verl: $(VERL_VENV)/.installed
	POLARS_MAX_THREADS=2 $(VERL_VENV)/bin/python bench/verl_grpo.py

sample: $(STAMP)
	$(BIN)/python examples/make_sample.py --seed 0 --out sample_data

docs: $(STAMP)
	$(BIN)/python docs/cli_reference.py

clean:
	rm -rf $(VENV) plots sample_data/rollouts.scored.parquet report.html
