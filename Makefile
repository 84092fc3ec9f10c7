# Two commands on a fresh machine: `make serve` (the HTTP service on the bundled model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test demo bench container-smoke clean

# The core (ONNX Runtime, BentoML; no torch) is all that serving and prediction need.
$(BIN)/seg: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	touch $@

# Training and the tests add torch and the rest (`train` and `dev` extras).
$(VENV)/.dev: $(BIN)/seg pyproject.toml
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $@

serve: $(BIN)/seg
	$(BIN)/seg serve

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

demo: $(BIN)/seg
	$(BIN)/seg predict data/samples --out out/demo --overlay

bench: $(VENV)/.dev
	$(BIN)/python bench/tiled.py
	$(BIN)/python bench/shapes.py
	$(BIN)/python bench/service.py
	$(BIN)/python bench/fuzz.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/accuracy.py --steps 100 --seeds 0,1 --parallel
	$(BIN)/python bench/distributed.py

container-smoke:
	scripts/container-smoke.sh

clean:
	rm -rf $(VENV) out runs .pytest_cache
