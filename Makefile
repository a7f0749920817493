# Two commands do all set-up on a fresh machine:
#   make demo   -- installs into .venv, then runs a local 3-peer demo swarm on bundled real data
#   make test   -- installs into .venv (plus headless chromium for the dashboard test), then runs the tests
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
DURATION ?= 120
PEERS ?= 3

.PHONY: demo test install browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# pinned: where pip has the CPU wheel (this project's machines keep it on local disk) it takes that one;
	# an unpinned `torch` could pull a newer multi-GB CUDA build
	$(VENV)/bin/pip install -q "torch==2.13.0"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

browser:
	bash scripts/install-browser.sh

demo: $(STAMP)
	$(VENV)/bin/swarmtrain demo --peers $(PEERS) --duration $(DURATION)

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info
