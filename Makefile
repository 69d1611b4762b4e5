# One command for the main job, one for the tests; both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PROJECT := projects/InsLocDetCo

.PHONY: setup test lint demo bench clean

setup: $(VENV)/.ready
$(VENV)/.ready: scripts/setup_env.sh setup.py
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

test: setup
	$(PY) -m pytest -q $(PROJECT)/tests

lint: setup
	$(PY) -m ruff check $(PROJECT) setup.py

bench: setup
	$(PY) $(PROJECT)/bench/bench_pretrain.py

clean:
	rm -rf output
