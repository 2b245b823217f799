PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean chromium

$(BIN)/supervisor: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/supervisor
	$(BIN)/supervisor run -f configs/demo.yaml

# The dashboard's browser test drives Debian's chromium (Playwright's own browser download
# is not reachable here). Installed when missing; the test says so when it cannot be.
chromium:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "make: chromium could not be installed: the dashboard's browser tests will be skipped"

test: $(BIN)/supervisor chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(BIN)/supervisor
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
