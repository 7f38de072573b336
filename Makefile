# The two commands of the README: `make reproduce` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m
OUT ?= results/$(MODEL)

$(BIN)/mechcopy: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	# The CPU build of torch first (2.13.0 lies on these machines' disk); a bare `torch` would pull CUDA.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(BIN)/mechcopy

setup: $(BIN)/mechcopy

reproduce: setup
	$(BIN)/mechcopy reproduce --model $(MODEL) --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q

.PHONY: setup reproduce test
