# fedclinic: `make demo` runs a real 3-hospital federation on this machine; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedclinic local --hospitals 3 --run-config examples/demo.toml

lint: $(STAMP)
	$(BIN)/ruff check .

# End-to-end tests mostly wait on Flower's 3 s polling: four workers overlap them.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -n 4 --dist load --maxschedchunk 1 --durations=20

clean:
	rm -rf runs .pytest_cache .ruff_cache
