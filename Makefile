# Two entry points: `make demo` (the main job end to end on the synthetic world) and `make test`.
# Both bootstrap .venv idempotently, with the exact builds of constraints.txt (pyproject.toml keeps ranges).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.perceptio-installed
DEMO := demo-out
# Where the +cpu torch build of constraints.txt is published (empty: only the configured indexes).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Asked only where it answers (5 s, once): on a closed network pip would retry it for every package,
# minutes in all, and take torch from the configured indexes or find-links instead.
# (Expanded once, in the install recipe only: `make test` with an installed .venv asks nothing.)
TORCH_INDEX_OPTION = $(if $(TORCH_INDEX),$(shell $(PYTHON) -c "import urllib.request; urllib.request.urlopen('$(TORCH_INDEX)/', timeout=5)" >/dev/null 2>&1 && echo --extra-index-url $(TORCH_INDEX)))
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH_INDEX_OPTION) -e ".[test]"
	touch $(STAMP)

# Slow tests run last, and only while 360 s of the session have not passed (tests/conftest.py), so
# that `make test` stays under 10 minutes on 2 cores; `make test-slow` runs every slow test.
test: $(STAMP)
	PERCEPTIO_TEST_BUDGET_S=360 $(BIN)/python -m pytest -q tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO)

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(DEMO) .pytest_cache
