# Two commands on a fresh machine: `make serve` and `make test`. Both set up .venv as needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test models clean constraints

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[all,test]"
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/python model_repo/build.py

serve: models
	$(BIN)/fleetserve start model_repo

# promtool (the metrics lint the tests run), unpacked from Debian's prometheus package, not installed.
$(BIN)/promtool: | $(STAMP)
	rm -rf $(VENV)/prometheus-deb && mkdir -p $(VENV)/prometheus-deb
	cd $(VENV)/prometheus-deb && apt-get download prometheus >/dev/null && dpkg -x prometheus_*.deb .
	cp $(VENV)/prometheus-deb/usr/bin/promtool $@
	rm -rf $(VENV)/prometheus-deb

# KServe's own clients for the tests, in a venv of their own: kserve pins dependencies of its own.
$(VENV)/kserve/bin/python: | $(STAMP)
	$(PYTHON) -m venv $(VENV)/kserve
	$(VENV)/kserve/bin/pip install --quiet "kserve==0.21.0"

test: models $(BIN)/promtool $(VENV)/kserve/bin/python
	$(BIN)/python -m pytest -q

# The versions the container image installs (Dockerfile.cpu, Dockerfile.gpu): this venv's, frozen.
constraints: $(STAMP)
	{ echo "# The versions the image installs: this repository's tested venv, frozen (make constraints)."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^fleetserve'; } > deploy/constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
	git clean -fdX model_repo
