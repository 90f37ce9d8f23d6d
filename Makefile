# Two commands on a fresh machine: `make serve` and `make test`. Both set up .venv as needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test models clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[all,test]"
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/python model_repo/build.py

serve: models
	$(BIN)/fleetserve start model_repo

test: models
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
	git clean -fdX model_repo
