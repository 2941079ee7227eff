# Two entry points for a newcomer (README): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= demo

.PHONY: demo test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh --system-only
	test -x $(PY) || python3 -m venv $(VENV)
	bash scripts/install.sh --python-only $(PY)
	touch $(STAMP)

# Builds a one-subject BIDS dataset from a T1w available offline, runs participant then group.
demo: $(STAMP)
	$(PY) scripts/make_demo_dataset.py $(DEMO)/bids
	$(VENV)/bin/bids_cadiff $(DEMO)/bids $(DEMO)/derivatives/cadiff participant -w $(DEMO)/work
	$(VENV)/bin/bids_cadiff $(DEMO)/bids $(DEMO)/derivatives/cadiff group
	@echo "demo outputs: $(DEMO)/derivatives/cadiff"

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(DEMO) .pytest_cache
