# Quick start:  make demo   (set-up, then a small training at 4 and 32 bits)
#               make test   (set-up, then the test suite)
# A second run with nothing changed recompiles nothing (make.sh's stamps).
PYTHON ?= python3
TF_PIN ?= tensorflow-cpu==2.21.0
# The Pythons that $(TF_PIN) has wheels for (PyPI); pyproject.toml says the same.
PY_MIN = 3.10
PY_MAX = 3.13
PIP = PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip install --quiet --disable-pip-version-check
# No TensorFlow start-up log lines (cpu feature guard, oneDNN, absl) before
# the programs' own output; errors still show.
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Modules that requirements.txt provides: found without importing them.
REQ_MODULES = numpy matplotlib sklearn PIL tensorflow_datasets pytest
INSTALLED = build/.installed-requirements

.PHONY: install check-python ops demo test test-deps bench

# A clear message on a Python that $(TF_PIN) has no wheels for (unless some
# TensorFlow is importable already: the ops are then built against it).
check-python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found; run make with PYTHON=/path/to/python3 (Python $(PY_MIN) to $(PY_MAX))" >&2; exit 1; }
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorflow') is None)" 2>/dev/null || \
	  $(PYTHON) -c "import sys; v = sys.version_info[:2]; ok = tuple(map(int, '$(PY_MIN)'.split('.'))) <= v <= tuple(map(int, '$(PY_MAX)'.split('.'))); ok or sys.stderr.write('make: Python %d.%d (%s) is not supported: $(TF_PIN) has wheels for Python $(PY_MIN) to $(PY_MAX) only. Run make with a supported Python, e.g. make PYTHON=python3.11\n' % (v + (sys.executable,))); sys.exit(not ok)"

# pip runs when requirements.txt changes or a module is missing.
install: check-python
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorflow') is None)" 2>/dev/null || $(PIP) "$(TF_PIN)"
	@if [ -f $(INSTALLED) ] && [ ! requirements.txt -nt $(INSTALLED) ] && $(PYTHON) -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in '$(REQ_MODULES)'.split()))"; then :; \
	 else $(PIP) -r requirements.txt && mkdir -p build && touch $(INSTALLED); fi

ops: install
	@PYTHON=$(PYTHON) bash make.sh

demo: ops
	@$(PYTHON) -m blpa.demo

# keras-hub for the transformer tests, without its tensorflow-text (which
# would pull a second TensorFlow); its other dependencies normally.
test-deps: install
	@$(PYTHON) -c "import keras_hub" 2>/dev/null || { $(PIP) --no-deps "keras-hub>=0.32" && $(PIP) regex rich tokenizers sentencepiece kagglehub; }

test: ops test-deps
	BLPA_REQUIRE_NATIVE=1 $(PYTHON) -m pytest -q

bench: ops
	$(PYTHON) bench/run.py --quick
