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

# supervisord's sample.conf for tests/test_convert.py, read out of the wheel (never installed: its
# import package is also named `supervisor`); systemd-analyze to verify exported units.
SUPERVISORD_WHEEL := .cache/supervisor-4.2.5-py2.py3-none-any.whl

$(SUPERVISORD_WHEEL):
	$(BIN)/pip download --quiet --no-deps supervisor==4.2.5 -d .cache/ || true

test: $(BIN)/supervisor $(SUPERVISORD_WHEEL)
	command -v systemd-analyze >/dev/null || (apt-get update -q && apt-get install -y -q systemd)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(BIN)/supervisor
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
