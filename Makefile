# Two commands do everything (see README):
#   make demo   set up the environment, then run the main job
#   make test   set up the environment, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test benchmarks clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/diffenergy demo --out-dir outputs/demo

test: setup
	$(PY) -m pytest -q tests

benchmarks: setup
	$(PY) benchmarks/likelihood_accuracy.py
	$(PY) benchmarks/md_throughput.py
	$(PY) benchmarks/divergence_speed.py
	$(PY) benchmarks/ala2_quality.py --aa-ns 1.0 --aa-replicas 1 --cg-ns 1.0
	$(PY) benchmarks/ala2_reweighting.py

clean:
	rm -rf $(VENV) outputs
