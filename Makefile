# `make demo` and `make test` are all a fresh machine needs: each creates .venv and installs into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench notebooks clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nemojax.cli demo --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup --max-worker-restart=0  # a crashed worker ends the run (a replaced one can hang it)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) experiments/bench_forward.py

# re-executes the notebooks at their documented scale and writes the paired .ipynb with their outputs
notebooks: $(STAMP)
	$(PY) notebooks/execute.py notebooks/elastic.py notebooks/minitron.py notebooks/nvfp4_qad.py

clean:
	rm -rf $(VENV) .pytest_cache
