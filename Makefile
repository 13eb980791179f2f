# prefork-esmtp: the two commands of the README, plus the benchmark.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Installed state is keyed on pyproject.toml: editing it reinstalls.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

## make run: the server on 127.0.0.1:2525 in the foreground; mail lands in ./maildir
run: $(VENV)/.installed
	$(BIN)/prefork-esmtp start --config conf/run.toml

## make test: the whole suite (unit, protocol over real sockets, real processes)
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

## make bench: side-by-side throughput and memory against peer servers
bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
