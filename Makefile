PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits_demo.py --cache .cache --out out

test: $(STAMP)
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || echo "make test: skipping the browser tests of nofc view: /usr/bin/chromium or /usr/bin/chromedriver missing (apt-get install -y chromium chromium-driver)"
	$(BIN)/python -m pytest -q -m "not slow"

# everything, the tests marked slow included (the whole suite is over 15 minutes on 2 cores)
test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache
