# One command each: `make demo` runs the main pipeline on a local Ray, `make test` runs the tests.
# Both create .venv and install everything on first use.

VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed-stamp
PYTHON    ?= python3
CACHE     := $(CURDIR)/.cache

# Offline-friendly, quiet, and every cache inside the checkout.
export RAYEMBED_CACHE        ?= $(CACHE)/rayembed
export TORCH_EXTENSIONS_DIR  ?= $(CACHE)/torch_extensions
export HF_HUB_OFFLINE        ?= 1
export TRANSFORMERS_OFFLINE  ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED      := 1

.PHONY: install demo demo-quick test test-fast bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, alone and pinned: a CPU wheel where one is offered, never an upgrade later.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,assets]"
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/rayembed pipeline --config jobs/configs/local/demo.yaml

demo-quick: install
	$(VENV)/bin/rayembed pipeline --config jobs/configs/local/demo-quick.yaml

test: install
	RAY_AUTH_MODE=disabled $(PY) -m pytest tests

test-fast: install
	RAY_AUTH_MODE=disabled $(PY) -m pytest tests -m "not slow"

# Every benchmark script (bench/*.py but report.py and the shared _*.py), then bench/RESULTS.md gathered from bench/out/*.json.
# A failing benchmark does not stop the others; the target fails at the end if any did.
bench: install
	@failed=""; for f in bench/*.py; do \
		case "$$(basename $$f)" in report.py|_*) continue;; esac; \
		echo "== $$f"; $(PY) $$f || failed="$$failed $$f"; \
	done; \
	$(PY) bench/report.py; \
	if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi

lint: install
	$(VENV)/bin/ruff check platform tests jobs serving bench

clean:
	rm -rf runs .pytest_cache $(CACHE)
