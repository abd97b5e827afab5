# The README's two commands: `make demo` and `make test`. Both create .venv and install pinned dependencies
# once; re-running is fast because the install is skipped while pyproject.toml and constraints.txt are unchanged.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and alone: pinned to the CPU build, so nothing later pulls a CUDA build.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# Bytecode for the package, as a non-editable install has: where PYTHONDONTWRITEBYTECODE is set, every process
	# would otherwise compile each module it imports (about 6 ms of a 16 ms load of MiniLM, its imports included).
	# demo and test compile again what changed since (an edited module's bytecode is otherwise stale for good).
	$(BIN)/python -m compileall -q compressor
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m compileall -q compressor
	$(BIN)/compress run recipes/minilm-int8-onnx.yaml

test: $(STAMP)
	$(BIN)/python -m compileall -q compressor
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) artifacts/*/ .pytest_cache
