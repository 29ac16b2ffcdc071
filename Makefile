# make run    installs requirements.txt into .venv and runs 00 -> 01 -> 02 -> 03 -> 04 with PARAMS
# make test   installs requirements-test.txt into .venv, then lints and runs every test
# make benchmark  runs benchmarks/throughput.py (pipeline vs model alone vs the original loop)
PARAMS ?= params/demo.yaml
VENV ?= .venv
PYTHON := $(VENV)/bin/python
RUNS := OUTPUT/runs/$(basename $(notdir $(PARAMS)))
STAGES := 00_setup 01_metadata 02_embed 03_merge 04_search

.PHONY: run test lint benchmark

$(PYTHON):
	python3 -m venv $(VENV)

$(VENV)/.installed-run: requirements.txt | $(PYTHON)
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed-run
	$(PYTHON) -m pip install --quiet -r requirements-test.txt
	touch $@

run: $(VENV)/.installed-run
	@mkdir -p $(RUNS)
	@for stage in $(STAGES); do \
		echo "== $$stage with $(PARAMS); executed notebook: $(RUNS)/$$stage.ipynb"; \
		$(PYTHON) -m papermill --log-level ERROR --stdout-file /dev/stdout \
			notebooks/$$stage.ipynb $(RUNS)/$$stage.ipynb -f $(PARAMS) || exit 1; \
	done

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check notebooks tests benchmarks
	$(VENV)/bin/ruff format --check notebooks/lib.py tests benchmarks

test: lint
	$(PYTHON) -m pytest

benchmark: $(VENV)/.installed-test
	$(PYTHON) benchmarks/throughput.py
