# The README's two commands are `make book` and `make test`; both set up .venv/ themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kalm-setup

.PHONY: setup book experiments studies test test-fast lint bench clean-book

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(PYTHON) $(VENV)
	touch $(STAMP)

# Runs every experiment notebook with papermill in the model's default profile (loading the runs
# published in book/runs/ and reusing finished runs of the run store), then builds the book from
# the executed copies in book/experiments/. `make book RETRAIN=1` trains every run anew.
book: setup experiments
	$(BIN)/jupyter-book build book/

experiments: setup
	$(BIN)/python -m kalm.execute $(if $(RETRAIN),--retrain)

# The study pages (self-negatives, tuning, lambda): many short training runs, cached in the run
# store like every other run; their executed pages are committed with the book's.
studies: setup
	$(BIN)/python -m kalm.execute --studies

# Unit tests, notebooks in the smoke profile (nbval) and the book build with warnings as errors.
test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest --nbval

# While editing: ruff and the unit tests, without the notebooks (nbval), the book build, the
# browser (tests marked `book`) and the longest training tests (marked `slow`): 4 min 53 s on 2
# CPU cores shared with other jobs (load average 7; 160 s of CPU). `make test` runs them all.
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/pytest tests -m "not book and not slow"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/run.py

clean-book:
	rm -rf book/_build
