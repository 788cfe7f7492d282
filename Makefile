# The two commands of the README:
#   make demo   -- set-up if needed, then the main job on the embedded default (CPU, no COCO)
#   make test   -- set-up if needed, then lint + the whole test suite (CI); locally
#                  make test PYTEST_ARGS='-m "not slow"' skips the long end-to-end tests
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test lint env clean-venv
setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m focal_det.demo $(DEMO_ARGS)

lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

env: setup
	$(PY) -m focal_det.env

clean-venv:
	rm -rf .venv
