# The README's two set-up commands. Both create .venv (Python 3.11) and install the pinned
# requirements plus this package on first use; later calls reuse it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= runs/demo

.PHONY: run test install bench-prepare bench-train clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# The content encoders (gtc-ray features) are an optional extra; the tests exercise them.
$(VENV)/.installed-features: $(VENV)/.installed requirements-features.txt
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-features.txt
	touch $@

install: $(VENV)/.installed

# Main job: synthetic dataset -> local Ray -> 2 DDP workers -> MLflow run + metrics.
run: install
	$(BIN)/gtc-ray data synth $(DEMO)/data --preset small --overwrite
	$(BIN)/gtc-ray train $(DEMO)/data --workers 2 --epochs 5 --storage $(DEMO)/runs \
	    --tracking-uri sqlite:///$(abspath $(DEMO))/mlflow.db --metrics-out $(DEMO)/metrics.json

# Two invocations: the e2e job test starts (and stops) its own Ray head node.
test: install $(VENV)/.installed-features
	$(BIN)/python -m pytest -ra -m "not e2e"
	$(BIN)/python -m pytest -ra -m e2e

bench-prepare: install
	$(BIN)/python bench/prepare.py

bench-train: install
	$(BIN)/python bench/train.py

clean:
	rm -rf runs gtc_runs .pytest_cache
