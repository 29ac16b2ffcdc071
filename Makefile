# make run    installs requirements.txt into .venv and runs 00 -> 01 -> 02 -> 03 -> 04 with PARAMS
#             (notebooks/run_stages.py: executed notebooks in OUTPUT_DIR/runs/, output streamed)
# make test   installs requirements-test.txt into .venv, then lints and runs every test
# make benchmark  runs benchmarks/throughput.py (pipeline vs model alone vs the original loop)
# make app    serves 04's search app: make app EMBEDDINGS=<file> [HOST=127.0.0.1] [PORT=7860] [PARAMS=...]
PARAMS ?= params/demo.yaml
HOST ?= 127.0.0.1
PORT ?= 7860
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: run test lint benchmark app

$(PYTHON):
	python3 -m venv $(VENV)

$(VENV)/.installed-run: requirements.txt | $(PYTHON)
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed-run
	$(PYTHON) -m pip install --quiet -r requirements-test.txt
	touch $@

run: $(VENV)/.installed-run
	@$(PYTHON) notebooks/run_stages.py $(PARAMS)

# PARAMS only when given: the app's defaults are 04's own
app: $(VENV)/.installed-run
	@$(PYTHON) notebooks/search_app.py --host $(HOST) --port $(PORT) $(if $(EMBEDDINGS),--embeddings $(EMBEDDINGS)) \
		$(if $(filter command line,$(origin PARAMS)),--params $(PARAMS))

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check notebooks tests benchmarks
	$(VENV)/bin/ruff format --check notebooks/*.py notebooks/lib tests benchmarks

test: lint
	$(PYTHON) -m pytest

benchmark: $(VENV)/.installed-test
	$(PYTHON) benchmarks/throughput.py
