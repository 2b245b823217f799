PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/supervisor: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/supervisor
	$(BIN)/supervisor run -f configs/demo.yaml

test: $(BIN)/supervisor
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(BIN)/supervisor
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
