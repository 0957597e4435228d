# The two commands a new user runs on a fresh machine (see README):
#   make demo   installs the package and runs the main job
#   make test   installs the package with its test extras and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch: pip finds it for this exact version; a plain "torch" would pull CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0

.PHONY: install-demo install-test demo test
install-demo: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[demo,tvm]'

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,tvm]'

demo: install-demo
	$(BIN)/srigl-compile demo

test: install-test
	$(BIN)/python -m pytest -q -n 2
