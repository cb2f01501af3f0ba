# driftloop: `make run` runs the whole loop on the embedded default; `make test` passes the tests.
# Both set themselves up from nothing (a .venv pinned by constraints.txt).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2

.PHONY: install run test lint format bench clean

install: $(STAMP)

# uv installs the pinned set in seconds where pip takes minutes. Wheel folders pip is told about
# (PIP_FIND_LINKS, pip's find-links setting) go to uv too: that is where a local CPU torch lies.
# --compile-bytecode: uv compiles every module once, in parallel, at install. Without it, the
# first test processes (Ray workers, CLI runs, jobs) each compiled what they imported, at once.
FIND_LINKS = $(sort $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt uv
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -c constraints.txt \
		$(foreach d,$(FIND_LINKS),--find-links $(d)) -e '.[dev,bench,trackers,services]'
	@rm -f $(VENV)/.installed-* && touch $@

run: install
	$(VENV)/bin/driftloop run configs/demo.yaml

test: install lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	mkdir -p runs/bench
	$(PY) benchmarks/stream_throughput.py --quick --json runs/bench/stream_throughput.json
	$(PY) benchmarks/produce_file.py --quick --json runs/bench/produce_file.json
	$(PY) benchmarks/ingest.py --quick --json runs/bench/ingest.json
	$(PY) benchmarks/ingest_s3.py --quick --json runs/bench/ingest_s3.json
	$(PY) benchmarks/train.py --quick --json runs/bench/train.json
	$(PY) benchmarks/tune.py --quick --json runs/bench/tune.json
	$(PY) benchmarks/mlflow_backend.py --quick --json runs/bench/mlflow_backend.json
	$(PY) benchmarks/serve.py --quick --json runs/bench/serve.json
	$(PY) benchmarks/drift.py --quick --json runs/bench/drift.json
	$(PY) benchmarks/models.py --quick --json runs/bench/models.json
	$(PY) benchmarks/report.py --quick --json runs/bench/report.json

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
