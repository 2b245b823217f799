PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean chromium shells

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

# The dashboard's browser test drives Debian's chromium (Playwright's own browser download
# is not reachable here); the completion tests parse zsh and fish scripts. Installed when
# missing; the tests say so when they cannot be.
chromium:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "make: chromium could not be installed: the dashboard's browser tests will be skipped"

shells:
	@{ command -v zsh >/dev/null && command -v fish >/dev/null; } || { command -v apt-get >/dev/null && \
		[ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zsh fish >/dev/null; } || \
		echo "make: zsh or fish could not be installed: their completion tests will be skipped"

test: $(BIN)/supervisor $(SUPERVISORD_WHEEL) chromium shells
	command -v systemd-analyze >/dev/null || (apt-get update -q && apt-get install -y -q systemd)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(BIN)/supervisor
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
