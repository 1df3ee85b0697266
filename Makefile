# `make demo` / `make test` / `make bench`: each creates .venv first when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch comes first and pinned, so that installing the package never pulls another multi-GB build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.rwkv-mm-installed
DEMO_STAMP := $(VENV)/.rwkv-mm-demo-installed

.PHONY: demo test bench kernels lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# the demo needs only the package and its `demo` extra (a quicker first start than the dev tools)
$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m demos.app --host 127.0.0.1 --port 7860

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_wkv.py

# build every compiled kernel now (otherwise each is built on first use) and print the build times
kernels: $(STAMP)
	$(PY) -m rwkv_mm.kernels

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis .torch_extensions
