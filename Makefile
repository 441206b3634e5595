# Quick start:  make demo   (set-up, then a small training at 4 and 32 bits)
#               make test   (set-up, then the test suite)
PYTHON ?= python3
TF_PIN ?= tensorflow-cpu==2.21.0
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install ops demo test bench

install:
	@$(PYTHON) -c "import tensorflow" 2>/dev/null || $(PIP) "$(TF_PIN)"
	@$(PIP) -r requirements.txt

ops: install
	bash make.sh

demo: ops
	TF_CPP_MIN_LOG_LEVEL=2 $(PYTHON) -m blpa.demo

test: ops
	BLPA_REQUIRE_NATIVE=1 $(PYTHON) -m pytest -q

bench: ops
	$(PYTHON) bench/run.py --quick
