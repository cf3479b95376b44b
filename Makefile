# Two entry points for a fresh machine: `make demo` and `make test` (`make notebook` re-executes the walkthrough
# notebook and rewrites its committed outputs).
# Both create .venv, install torch 2.13 when no torch is present (any build; the CPU one suffices), install this
# package with its test extra, every package pinned by constraints.txt (the versions the shipped numbers were made
# with), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The real mmcv 1.7.2 (pure Python, in its own folder) for the tests against ORION's runner family;
# when it cannot be built (no PyPI), those tests skip and say why.
MMCV1X_STAMP := $(VENV)/mmcv1x/.built

.PHONY: demo test notebook setup clean constraints

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

CONSTRAINTS := constraints.txt

$(STAMP): $(PY) setup.py $(CONSTRAINTS)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c $(CONSTRAINTS) torch
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) demo_kd_50_pruning.py

notebook: $(STAMP)
	$(PY) tools/run_notebook.py

$(MMCV1X_STAMP): $(STAMP) tests/mmcv1x_env.py
	-$(PY) tests/mmcv1x_env.py

test: $(STAMP) $(MMCV1X_STAMP)
	$(PY) -m pytest -q -rs -n 2 --dist loadfile tests

# After rerunning the shipped numbers in a new environment: pin what it holds (this package itself left out).
constraints: $(STAMP)
	{ sed -n '1,3p' $(CONSTRAINTS); $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) work_dirs
